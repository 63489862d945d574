"""The service's real processes: ``celery worker``, ``celery beat`` and Flower.

Started with a given environment and logging to files, for the soak, the benchmarks and the
end-to-end tests.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from soak.support import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcesses:
    """Starts the Procfile's processes with an environment and stops them all at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        #: The latest process started under each name.
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def _start(self, name: str, *arguments: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", *arguments],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes[name] = process
        return process

    def worker(
        self, name: str = "w1", concurrency: int = 16, level: str = "INFO"
    ) -> subprocess.Popen[bytes]:
        worker_options = ["-n", f"{name}@%h", "--concurrency", str(concurrency)]
        quiet = ["--without-mingle", "--without-gossip"]
        return self._celery(name, "worker", level, *worker_options, *quiet)

    def beat(self, name: str = "beat", level: str = "INFO") -> subprocess.Popen[bytes]:
        return self._celery(name, "beat", level)

    def _celery(self, name: str, command: str, level: str, *options: str) -> Any:
        return self._start(name, "celery", "-A", "worker", command, "-l", level, *options)

    def flower(self) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        process = self._start("flower", "worker", "flower", "--port", str(port))
        return process, port

    def wait_ready(self, name: str = "w1", timeout: float = 30) -> None:
        """Wait for a worker to log that it is ready to take tasks."""
        wait_until(lambda: " ready." in self.log_text(name), timeout, f"worker {name} to start")

    def task_results(self, name: str, task: str) -> list[Any]:
        """The results a worker logged for one task name (Celery logs them at INFO)."""
        pattern = re.compile(rf"Task {re.escape(task)}\[[^\]]+\] succeeded in \S+: (.*)$", re.M)
        return [ast.literal_eval(found) for found in pattern.findall(self.log_text(name))]

    def log_text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        process.send_signal(sig)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                self.stop(process)
