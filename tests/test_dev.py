"""``make run`` (``python -m worker dev``): the demo, in a place of its own, as a newcomer runs it.

Every process is real: the demo, its children, and each command run beside it from another
"terminal" (a process of its own, with ``--demo``). The default store, a real embedded Redis
in DATA_DIR holding imported credentials, is watched for any change the demo makes to it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import requests

from tests.conftest import CLIENT_ID, REDIRECT_URI, ROOT, free_port, run_cli, run_python, wait_for
from worker.redis_server import Answer, RedisServer, answer
from worker.sandbox import Sandbox

#: The options of ``dev`` that name a port, in the order of :func:`_free_ports`.
Popen = subprocess.Popen[bytes]

PORT_OPTIONS = ("--port", "--flower-port", "--sandbox-port", "--redis-port")


def _free_ports() -> dict[str, int]:
    return {option: free_port() for option in PORT_OPTIONS}


def _options(ports: dict[str, int]) -> list[str]:
    return [text for option, port in ports.items() for text in (option, str(port))]


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.ConnectionError:
        return False


@contextmanager
def _dev(
    env: dict[str, str], ports: dict[str, int], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m worker dev`` in a terminal session of its own, once its web page and Flower
    answer; whatever a failed test leaves running is killed."""
    with log.open("wb") as output:
        dev = subprocess.Popen(
            [sys.executable, "-m", "worker", "dev", *_options(ports)],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # as a terminal starts it: Ctrl-C goes to its group
        )
    try:
        for url in (
            f"http://127.0.0.1:{ports['--port']}/healthz",
            f"http://127.0.0.1:{ports['--flower-port']}/healthcheck",
        ):
            wait_for(
                lambda url=url: _answers(url) or dev.poll() is not None,
                timeout=90,
                message=url,
            )
            assert dev.poll() is None, log.read_text()[-3000:]
        yield dev
    finally:
        if dev.poll() is None:
            for process in psutil.Process(dev.pid).children(recursive=True):
                process.kill()
            dev.kill()
            dev.wait()


def _descendants(process: Popen) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie (an orphan no init has reaped yet) has ended."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _credential_records(server: RedisServer) -> dict[bytes, bytes | None]:
    client = redis.Redis.from_url(server.url)
    try:
        return {key: client.get(key) for key in client.scan_iter(match="mtk:cred:*")}
    finally:
        client.close()


@pytest.fixture
def default_store(tmp_path: Path, sandbox: Sandbox) -> Iterator[tuple[dict[str, str], RedisServer]]:
    """A newcomer's valid setup: the embedded Redis in DATA_DIR, two credentials imported."""
    for name in ("REDIS_URL", "MIRO_CLIENT_ID", "TOKEN_ENCRYPTION_KEYS"):
        assert name not in os.environ
    env = {"DATA_DIR": str(tmp_path / "var"), "EMBEDDED_REDIS_PORT": str(free_port())}
    server = RedisServer.embedded(tmp_path / "var", int(env["EMBEDDED_REDIS_PORT"]))
    try:
        imported = run_cli(env, "import", "-", stdin=json.dumps(sandbox.create_grants(2)))
        assert imported.returncode == 0, imported.stderr
        assert len(_credential_records(server)) == 2
        yield env, server
    finally:
        server.stop()


def _demo_cli(env: dict[str, str], *args: str) -> Any:
    """A command run beside the demo, from another terminal, as the README writes it."""
    result = run_cli(env, "--demo", *args)
    assert result.returncode == 0, result.stderr
    return result


def _readme_python_example() -> str:
    """The README's walk-through's call to Miro from Python, as a newcomer copies it."""
    section = (ROOT / "README.md").read_text().split("## Try it", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert example, "the README's walk-through has no Python example"
    return textwrap.dedent(example.group(1))


def _sandbox_tokens(ports: dict[str, int]) -> dict[str, str]:
    grants = requests.get(f"http://127.0.0.1:{ports['--sandbox-port']}/_sandbox/grants", timeout=5)
    return {f"{g['team_id']}:{g['user_id']}": g["access_token"] for g in grants.json()}


@pytest.mark.slow
def test_every_readme_command_works_beside_the_demo_which_leaves_the_default_store_be(
    tmp_path: Path, default_store: tuple[dict[str, str], RedisServer]
) -> None:
    env, store = default_store
    before = _credential_records(store)
    ports = _free_ports()
    with _dev(env, ports, tmp_path / "dev.log") as dev:
        rows = json.loads(_demo_cli(env, "list", "--json").stdout)
        assert len(rows) == 5 and {row["state"] for row in rows} == {"active"}
        assert json.loads(_demo_cli(env, "status", "--json").stdout)["by_state"] == {"active": 5}
        chosen = "3074457358607431473:3458764513820540928"  # the README's example, as written
        assert rows[0]["id"] == chosen
        assert _demo_cli(env, "token", chosen).stdout.strip() == _sandbox_tokens(ports)[chosen]
        rotated = _demo_cli(env, "rotate", chosen, "--now").stdout.splitlines()[-1]
        assert rotated.split()[:3] == [chosen, "rotated", "2"]
        assert _demo_cli(env, "token", chosen).stdout.strip() == _sandbox_tokens(ports)[chosen]
        called = run_python(env, "-c", _readme_python_example())
        assert called.returncode == 0, called.stderr
        assert called.stdout.strip() == "Sandbox board uXjVOfjkmAk="
        revoked = json.loads(_demo_cli(env, "revoke", chosen).stdout)
        assert revoked == {"id": chosen, "known_to_miro": True, "deleted": True}
        link = _demo_cli(env, "connect-url").stdout.strip()
        assert link.startswith(f"http://127.0.0.1:{ports['--sandbox-port']}/oauth/authorize?")
        connected = requests.get(link, timeout=10)  # the sandbox approves, the web page stores
        assert connected.status_code == 200 and connected.url.startswith(
            f"http://127.0.0.1:{ports['--port']}/oauth/callback"
        )
        assert len(json.loads(_demo_cli(env, "list", "--json").stdout)) == 5
        doctor = _demo_cli(env, "doctor").stdout
        assert "OK    miro" in doctor and "FAIL" not in doctor
        second = run_cli(env, "dev", *_options(_free_ports()))
        assert second.returncode == 1 and "a demo already runs" in second.stderr
        assert len(json.loads(_demo_cli(env, "list", "--json").stdout)) == 5  # undisturbed
        children = _descendants(dev)
        assert len(children) >= 5  # Redis, worker, beat, Flower, web
        os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C in its terminal
        assert dev.wait(timeout=120) == 0
    output = (tmp_path / "dev.log").read_text()
    assert "ERROR" not in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not _alive(children)
    assert answer(ports["--redis-port"], None) is Answer.DOWN
    assert _credential_records(store) == before  # alive, and as the import left it
    listed = run_cli(env, "--demo", "list")
    assert listed.returncode == 1 and "no demo runs" in listed.stderr


@pytest.mark.slow
def test_a_process_that_exits_on_its_own_stops_the_demo_with_an_error(tmp_path: Path) -> None:
    ports = _free_ports()
    with _dev({"DATA_DIR": str(tmp_path / "var")}, ports, tmp_path / "dev.log") as dev:
        children = _descendants(dev)
        [web] = [c for c in psutil.Process(dev.pid).children() if c.cmdline()[-3:-2] == ["web"]]
        web.kill()
        assert dev.wait(timeout=120) == 1
    output = (tmp_path / "dev.log").read_text()
    assert "ERROR worker.dev: web exited with -9; stopping everything" in output, output[-3000:]
    assert not _alive(children)


@pytest.mark.slow
def test_with_an_app_configured_dev_runs_the_service_against_its_store_and_adds_nothing(
    tmp_path: Path, default_store: tuple[dict[str, str], RedisServer], client_secret: str
) -> None:
    env, store = default_store
    env = {
        **env,
        "MIRO_CLIENT_ID": CLIENT_ID,
        "MIRO_CLIENT_SECRET": client_secret,
        "MIRO_REDIRECT_URI": REDIRECT_URI,
    }
    before = _credential_records(store)
    ports = {option: port for option, port in _free_ports().items() if option in PORT_OPTIONS[:2]}
    with _dev(env, ports, tmp_path / "dev.log") as dev:
        assert _credential_records(store).keys() == before.keys()
        dev.send_signal(signal.SIGTERM)
        assert dev.wait(timeout=120) == 0
    output = (tmp_path / "dev.log").read_text()
    assert "ERROR" not in output, output[-3000:]
    assert _credential_records(store).keys() == before.keys()  # its Redis runs on: not ours
    assert not (tmp_path / "var" / "demo").exists()


def test_the_demo_refuses_to_start_when_redis_url_is_set(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path / "var"), "REDIS_URL": "redis://127.0.0.1:1/0"}
    result = run_cli(env, "dev", *_options(_free_ports()))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: REDIS_URL is set") and "Unset REDIS_URL" in line
    assert not (tmp_path / "var").exists()


def test_the_demo_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "var" / "demo" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("not the demo's")
    result = run_cli({"DATA_DIR": str(tmp_path / "var")}, "dev", *_options(_free_ports()))
    assert result.returncode == 1
    assert "holds files the demo did not make" in result.stderr
    assert precious.read_text() == "not the demo's"


def test_the_demo_refuses_a_port_in_use_and_names_its_option(tmp_path: Path) -> None:
    ports = _free_ports()
    with socket.create_server(("127.0.0.1", ports["--flower-port"])):
        result = run_cli({"DATA_DIR": str(tmp_path / "var")}, "dev", *_options(ports))
    assert result.returncode == 1
    assert f"port {ports['--flower-port']}" in result.stderr and "--flower-port" in result.stderr
