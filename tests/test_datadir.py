"""DATA_DIR: the directory 0700 and every file in it 0600, under any umask; no password shown."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from settings import Settings
from tests.conftest import CLIENT_ID, REDIRECT_URI, ROOT, free_port, wait_for
from worker.crypto import TokenCipher
from worker.journal import Journal, JournalEntry
from worker.redis_server import PASSWORD_FILE, RedisServer
from worker.sandbox import Sandbox
from worker.web.state import secret_key


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """Umask 000, as some container images and service managers set it."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def _open_to_others(data_dir: Path) -> dict[str, str]:
    """What in DATA_DIR (itself included) is not 0700 for a directory or 0600 for a file."""
    found = {}
    for path in [data_dir, *data_dir.rglob("*")]:
        status = path.lstat()
        mode = stat.S_IMODE(status.st_mode)
        if mode != (0o700 if stat.S_ISDIR(status.st_mode) else 0o600):
            found[str(path.relative_to(data_dir))] = oct(mode)
    return found


def test_the_keys_and_the_journal_are_private_under_umask_000(
    tmp_path: Path, loose_umask: None
) -> None:
    data_dir = tmp_path / "var"
    settings = Settings.from_env({"DATA_DIR": str(data_dir)})

    TokenCipher.from_settings(settings)
    secret_key(settings)
    journal = Journal(data_dir)
    journal.spill(JournalEntry("1:2", "1", b"record", None))

    names = {path.name for path in data_dir.iterdir()}
    assert {"encryption.key", "web-secret.key", "journal.jsonl", "journal.jsonl.lock"} <= names
    assert _open_to_others(data_dir) == {}


def test_an_existing_data_dir_open_to_others_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    caplog.set_level(logging.WARNING)

    TokenCipher.from_settings(Settings.from_env({"DATA_DIR": str(data_dir)}))

    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert "was open to other users (mode 0755): made it 0700" in caplog.text


class _Install:
    """The service's processes on a fresh machine whose umask is 000, with the embedded Redis."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.logs = logs
        self.processes: list[subprocess.Popen[bytes]] = []
        logs.mkdir()

    def run(self, *arguments: str) -> str:
        done = subprocess.run(
            [sys.executable, *arguments], env=self.env, cwd=ROOT, capture_output=True,
            timeout=60, check=False, umask=0,
        )  # fmt: skip
        return done.stdout.decode() + done.stderr.decode()

    def start(self, name: str, *arguments: str) -> None:
        with (self.logs / f"{name}.log").open("wb") as log:
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, *arguments],
                    env=self.env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    umask=0,
                )
            )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _page(url: str, login: str) -> str | None:
    try:
        response = requests.get(url, auth=tuple(login.split(":")), timeout=5)
    except requests.ConnectionError:
        return None
    return response.text if response.status_code == 200 else None


@pytest.mark.slow
def test_a_fresh_install_under_umask_000_keeps_data_dir_private_and_redis_password_unseen(
    tmp_path: Path, sandbox: Sandbox, client_secret: str
) -> None:
    data_dir, redis_port, flower_port = tmp_path / "var", free_port(), free_port()
    env = {
        "DATA_DIR": str(data_dir),
        "EMBEDDED_REDIS_PORT": str(redis_port),
        "MIRO_CLIENT_ID": CLIENT_ID,
        "MIRO_CLIENT_SECRET": client_secret,
        "MIRO_REDIRECT_URI": REDIRECT_URI,
        "MIRO_API_URL": sandbox.url,
        "MIRO_AUTH_URL": sandbox.url,
        "FLOWER_BASIC_AUTH": f"admin:{secrets.token_urlsafe(12)}",
    }
    for name in ("REDIS_URL", "TOKEN_ENCRYPTION_KEYS"):
        assert name not in os.environ  # the embedded Redis and the generated key
    install = _Install(env, tmp_path / "logs")
    shown: dict[str, str] = {}
    try:
        shown["connect-url"] = install.run("-m", "worker", "connect-url")  # Redis, both keys
        install.start("worker", "-m", "celery", "-A", "worker", "worker", "-l", "DEBUG",
                      "--concurrency", "2", "--without-mingle", "--without-gossip")  # fmt: skip
        install.start("beat", "-m", "celery", "-A", "worker", "beat", "-l", "DEBUG")
        install.start("flower", "-m", "worker", "flower", "--port", str(flower_port))
        flower = f"http://127.0.0.1:{flower_port}"
        wait_for(lambda: " ready." in install.log("worker"), 60, "the worker to start")
        wait_for(lambda: "beat: Waking up" in install.log("beat"), 60, "beat's first scan")
        login = env["FLOWER_BASIC_AUTH"]
        workers = wait_for(lambda: _page(f"{flower}/api/workers?refresh=1", login), 60, "Flower")
        shown |= {
            "flower workers": workers,
            "flower broker": _page(f"{flower}/broker", login) or "",
        }
        shown |= {command: install.run("-m", "worker", command) for command in ("doctor", "status")}
    finally:
        install.stop_all()
        shown |= {name: install.log(name) for name in ("worker", "beat", "flower")}
        password = (data_dir / PASSWORD_FILE).read_text().strip()
        RedisServer(data_dir, redis_port).stop()

    assert " ready." in shown["worker"] and "Waking up" in shown["beat"]  # both did their work
    masked = f"redis://:**@127.0.0.1:{redis_port}/0"  # the URL, as Celery and Flower show it
    assert masked in shown["worker"] and masked in shown["flower broker"]
    assert '"conf"' in shown["flower workers"]  # Flower showed the worker's configuration
    assert _open_to_others(data_dir) == {}
    names = {path.name for path in data_dir.rglob("*")}
    for made_by in ("redis.conf", "appendonly", "redis.log", "encryption.key", "flower.db"):
        assert any(name.startswith(made_by) for name in names), made_by
    assert [where for where, text in shown.items() if password in text] == []
