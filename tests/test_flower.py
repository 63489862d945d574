"""Flower: a login, ids and outcomes only, the history kept across a restart, and the same
safe defaults whether it is started by ``python -m worker flower`` or ``celery -A worker flower``.
"""

from __future__ import annotations

import ast
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from soak.processes import ServiceProcesses
from soak.support import free_port
from tests.conftest import ROOT, run_cli, wait_for
from worker.sandbox import Sandbox
from worker.vault import Vault

pytestmark = pytest.mark.slow


def _tasks(port: int, auth: tuple[str, str]) -> dict[str, Any] | None:
    try:
        response = requests.get(f"http://127.0.0.1:{port}/api/tasks", auth=auth, timeout=5)
    except requests.ConnectionError:
        return None
    return response.json() if response.status_code == 200 else None


def test_flower_shows_ids_and_outcomes_and_keeps_them_across_a_restart(
    sandbox: Sandbox, vault: Vault, env: dict[str, str], tmp_path: Any
) -> None:
    auth = ("admin", secrets.token_urlsafe(12))
    env = {**env, "FLOWER_BASIC_AUTH": ":".join(auth)}
    service = ServiceProcesses(env, tmp_path / "logs")
    credential = vault.import_response({**sandbox.create_grants(1)[0], "expires_in": 3599})
    try:
        service.worker()
        flower, port = service.flower()
        service.wait_ready()
        wait_for(lambda: _tasks(port, auth) is not None, timeout=30, message="Flower's API")
        assert run_cli(env, "rotate", str(credential.id), "--wait").returncode == 0

        def rotated_task() -> dict[str, Any] | None:
            tasks = _tasks(port, auth) or {}
            return next(
                (t for t in tasks.values() if t.get("name") == "tasks.refresh.rotate"
                 and t.get("state") == "SUCCESS"),
                None,
            )  # fmt: skip

        task = wait_for(rotated_task, timeout=30, message="the rotation in Flower")
        assert str(credential.id) in task["args"]
        assert "'outcome': 'rotated'" in task["result"]
        assert requests.get(f"http://127.0.0.1:{port}/api/tasks", timeout=5).status_code == 401

        service.stop(flower)  # Flower saves its state on a clean stop
        _, port = service.flower()
        wait_for(lambda: _tasks(port, auth) is not None, timeout=30, message="Flower again")
        history = _tasks(port, auth) or {}
        assert task["uuid"] in history
    finally:
        service.stop_all()
    grant = sandbox.grant(credential.id.team_id, credential.id.user_id)
    assert grant is not None
    for secret in (grant["access_token"], grant["refresh_token"]):
        assert secret not in str(task)


def test_flower_lists_beats_refreshes_by_credential_and_outcome_and_no_scan(
    sandbox: Sandbox, vault: Vault, env: dict[str, str], tmp_path: Any
) -> None:
    auth = ("admin", secrets.token_urlsafe(12))
    service = ServiceProcesses({**env, "FLOWER_BASIC_AUTH": ":".join(auth)}, tmp_path / "logs")
    try:
        service.worker()
        _, port = service.flower()
        service.wait_ready()
        wait_for(lambda: _tasks(port, auth) is not None, timeout=30, message="Flower's API")
        grants = [{**grant, "expires_in": 60} for grant in sandbox.create_grants(3)]
        due = {str(credential.id) for credential in vault.import_many(grants)}
        service.beat()

        def refreshed() -> list[dict[str, Any]] | None:
            tasks = list((_tasks(port, auth) or {}).values())
            done = [t for t in tasks if t["state"] == "SUCCESS"]
            return tasks if all(any(i in str(t["result"]) for t in done) for i in due) else None

        tasks = wait_for(refreshed, timeout=30, message="the refreshes in Flower")
    finally:
        service.stop_all()

    assert {task["name"] for task in tasks} == {"tasks.refresh.refresh_due"}  # no scan task
    for task in tasks:
        [credential_id] = ast.literal_eval(task["kwargs"])["credential_ids"]
        assert task["args"] == "()"
        assert ast.literal_eval(task["result"]) == {"rotated": [credential_id]}
    assert {ast.literal_eval(task["kwargs"])["credential_ids"][0] for task in tasks} == due


#: Flower's two entry points, each as an operator would type it.
ENTRY_POINTS = {
    "python -m worker flower": ["-m", "worker", "flower"],
    "celery -A worker flower": ["-m", "celery", "-A", "worker", "flower"],
}


@contextmanager
def running_flower(
    entry_point: str, env: dict[str, str], logs: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Flower started from ``entry_point`` and serving on 127.0.0.1; stopped by SIGTERM."""
    port = free_port()
    with (logs / "flower.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, *ENTRY_POINTS[entry_point], f"--port={port}"],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: process.poll() is not None or _status(port, "/healthcheck") == 200,
            timeout=30,
            message="Flower's /healthcheck",
        )
        assert process.poll() is None, (logs / "flower.log").read_text()
        yield process, port
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def _status(port: int, path: str, **options: Any) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}{path}", timeout=5, **options).status_code
    except requests.ConnectionError:
        return None


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_flower_refuses_a_request_for_a_host_it_does_not_serve(
    entry_point: str, env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "FLOWER_ALLOWED_HOSTS": "flower.internal"}
    with running_flower(entry_point, env, tmp_path) as (_, port):
        rebound = {"Host": f"rebound.example:{port}"}
        forged = requests.get(f"http://127.0.0.1:{port}/", headers=rebound, timeout=5)
        forged_metrics = _status(port, "/metrics", headers=rebound)
        probe = _status(port, "/healthcheck", headers={"Host": "10.1.2.3"})
        served = {
            host: _status(port, "/", headers={"Host": host})
            for host in (
                f"127.0.0.1:{port}",
                f"localhost:{port}",
                f"[::1]:{port}",
                "flower.internal",
            )
        }

    assert (forged.status_code, forged_metrics) == (400, 400)
    assert "FLOWER_ALLOWED_HOSTS" in forged.text
    assert probe == 200  # probes ask by the machine's address
    assert served == dict.fromkeys(served, 200)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_the_login_is_read_from_its_file_and_is_on_no_command_line(
    entry_point: str, env: dict[str, str], tmp_path: Path
) -> None:
    login = ("admin", secrets.token_urlsafe(12))
    login_file = tmp_path / "flower-login"
    login_file.write_text(":".join(login))
    env = {**env, "FLOWER_BASIC_AUTH_FILE": str(login_file)}

    with running_flower(entry_point, env, tmp_path) as (flower, port):
        without = _status(port, "/api/workers")
        with_login = _status(port, "/api/workers", auth=login)
        command_line = " ".join(psutil.Process(flower.pid).cmdline())

    assert (without, with_login) == (401, 200)
    assert login[1] not in command_line


def test_celery_flower_listens_on_localhost_and_keeps_its_history_in_data_dir(
    env: dict[str, str], tmp_path: Path
) -> None:
    with running_flower("celery -A worker flower", env, tmp_path) as (flower, port):
        listening = {
            connection.laddr.ip
            for connection in psutil.Process(flower.pid).net_connections(kind="inet")
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
        }

    assert listening == {"127.0.0.1"}
    assert list(Path(env["DATA_DIR"]).glob("flower.db*"))  # saved on the way out


def test_celery_flower_refuses_all_interfaces_without_a_login(env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", "--address=0.0.0.0"],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT), "FLOWER_PORT": str(free_port())},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 1
    assert "FLOWER_BASIC_AUTH" in result.stderr
