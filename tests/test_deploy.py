"""The Procfile as a deploy runs it, on what requirements.txt alone installs.

A fresh virtualenv gets ``pip install -r requirements.txt`` and nothing else (a dependency that
only the dev requirements bring in would pass every other test), then each Procfile line is
started as written, the way a Heroku-style process manager does: through ``sh``, in the
project's root, with the virtualenv's ``bin`` first on PATH and the settings in the
environment. Each process must show that it serves, and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from soak.support import free_port
from tests.conftest import ROOT, wait_for
from tests.venvs import fresh_virtualenv, isolated_environment
from worker.sandbox import Sandbox
from worker.vault import Vault

pytestmark = pytest.mark.slow

#: How long each process may take to show it serves, and to stop after SIGTERM.
SERVE_DEADLINE = 60
STOP_DEADLINE = 30


def procfile() -> dict[str, str]:
    """The Procfile's processes: name -> command line, in its order."""
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


@pytest.fixture(scope="module")
def runtime_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv's ``bin`` with requirements.txt installed in it, and nothing else."""
    return fresh_virtualenv(tmp_path_factory.mktemp("deploy") / "venv", ROOT / "requirements.txt")


class Procfile:
    """The Procfile's processes, each in a process group of its own, logging to a file."""

    def __init__(self, environment: dict[str, str], logs: Path) -> None:
        self.environment = environment
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: str) -> None:
        # `exec` makes the process the shell's own, so a signal and its exit code are the
        # process's (bash does so by itself for a single command; dash does not).
        with (self.logs / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                ["sh", "-c", f"exec {command}"],
                cwd=ROOT,
                env=self.environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_serving(self, condition: Callable[[], bool], message: str) -> None:
        """Wait for ``condition``; fail at once, with its log, if a process exits meanwhile."""

        def serving() -> bool:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    log = self.log(name)[-3000:]
                    pytest.fail(f"{name} exited with {process.returncode}:\n{log}")
            return condition()

        wait_for(serving, timeout=SERVE_DEADLINE, message=message)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to each process group; each one's exit code, None if it outlived the deadline."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                codes[name] = None
        return codes


@pytest.fixture
def deployment(runtime_bin: Path, env: dict[str, str], tmp_path: Path) -> Iterator[Procfile]:
    environment = isolated_environment()
    environment.update(env)
    environment.update(
        PATH=f"{runtime_bin}{os.pathsep}{os.environ['PATH']}",
        PORT=str(free_port()),
        WEB_ADDRESS="127.0.0.1",
        FLOWER_PORT=str(free_port()),
        FLOWER_ADDRESS="127.0.0.1",
        WORKER_CONCURRENCY="4",
        PYTHONUNBUFFERED="1",
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = Procfile(environment, logs)
    yield processes
    processes.stop()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def test_every_procfile_process_serves_from_requirements_txt_alone_and_stops_cleanly(
    deployment: Procfile, runtime_bin: Path, vault: Vault, sandbox: Sandbox
) -> None:
    environment = deployment.environment
    due = vault.import_response({**sandbox.create_grants(1)[0], "expires_in": 60})
    assert set(procfile()) == {"worker", "beat", "flower", "web"}
    for name, command in procfile().items():
        deployment.start(name, command)

    def pinged() -> bool:
        ping = subprocess.run(
            ["sh", "-c", "celery -A worker inspect ping"],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return ping.returncode == 0 and "pong" in ping.stdout

    deployment.wait_serving(pinged, "the worker to answer `celery inspect ping`")
    # Only beat's scan queues a due credential's refresh: its rotation shows beat at work.
    deployment.wait_serving(
        lambda: vault.store.load(due.id).version > due.version,
        "beat's scan to have the due credential rotated",
    )
    flower = f"http://127.0.0.1:{environment['FLOWER_PORT']}/healthcheck"
    deployment.wait_serving(lambda: _answers(flower), "Flower's /healthcheck")
    web = f"http://127.0.0.1:{environment['PORT']}/healthz"
    deployment.wait_serving(lambda: _answers(web), "the web page's /healthz")

    codes = deployment.stop()

    logs = {name: deployment.log(name)[-2000:] for name in codes}
    assert codes == dict.fromkeys(codes, 0), logs
