"""What every benchmark stands on: its own Redis, its own Miro sandbox, real service processes.

Each benchmark starts a fresh ``redis-server`` on a free loopback port in a temporary
directory, configured exactly as the embedded one the product starts (``appendonly yes``,
``appendfsync always``: every rotation is on disk before it is acknowledged), and a sandbox on
another loopback port. Service processes are the Procfile's: ``celery -A worker worker`` and
``celery -A worker beat``, started with the benchmark's environment. Everything is stopped and
deleted on the way out, whatever happens.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from cryptography.fernet import Fernet

from settings import Settings
from soak.processes import ServiceProcesses
from soak.support import free_port, wait_until
from worker.redis_server import RedisServer
from worker.sandbox import Faults, Sandbox, SandboxConfig
from worker.vault import Vault

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID = "3458764500000000001"
#: The Miro token endpoint's shared rate limit in the benchmarks. The product's default (50/s)
#: is a guess at Miro's limit; the sandbox has none, and the benchmarks measure the service.
BENCH_TOKEN_RATE = "100000"
#: Other processes using more than this many cores during a measurement disturb it.
DISTURBED_CORES = 0.25


class BenchRedis(RedisServer):
    """The product's Redis command line, with the fsync policy as a knob for side figures."""

    def __init__(self, data_dir: Path, port: int, appendfsync: str = "always") -> None:
        super().__init__(data_dir, port)
        self.appendfsync = appendfsync

    def command(self, *, daemonize: bool) -> list[str]:
        arguments = super().command(daemonize=daemonize)
        arguments[arguments.index("--appendfsync") + 1] = self.appendfsync
        return arguments


@dataclass
class Stack:
    """A running Redis and sandbox, and the environment a service process would get."""

    directory: Path
    redis_server: BenchRedis
    sandbox: Sandbox
    env: dict[str, str]
    _clients: list[redis.Redis] = field(default_factory=list)

    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def vault(self) -> Vault:
        return Vault.from_settings(self.settings(), self.redis())

    def redis(self) -> redis.Redis:
        client = redis.Redis.from_url(self.redis_server.url, socket_timeout=60)
        self._clients.append(client)
        return client

    def used_memory(self) -> int:
        """``INFO memory`` ``used_memory``, after Redis has freed what it lazily frees."""
        return int(self.redis().info("memory")["used_memory"])

    def close(self) -> None:
        for client in self._clients:
            client.close()


@contextmanager
def stack(
    *,
    access_ttl: int = 3599,
    latency_ms: float = 0.0,
    appendfsync: str = "always",
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """A fresh Redis and sandbox for one benchmark, torn down on exit."""
    directory = Path(tempfile.mkdtemp(prefix="mtk-bench-"))
    client_secret = secrets.token_urlsafe(24)
    server = BenchRedis(directory / "redis", free_port(), appendfsync)
    sandbox = Sandbox(
        SandboxConfig(client_id=CLIENT_ID, client_secret=client_secret, access_ttl=access_ttl),
        Faults(latency_ms=latency_ms),
    )
    try:
        server.start()
        sandbox.start()
        environ = {
            "REDIS_URL": server.url,
            "MIRO_CLIENT_ID": CLIENT_ID,
            "MIRO_CLIENT_SECRET": client_secret,
            "MIRO_REDIRECT_URI": "http://127.0.0.1:5000/oauth/callback",
            "MIRO_API_URL": sandbox.url,
            "MIRO_AUTH_URL": sandbox.url,
            "TOKEN_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "DATA_DIR": str(directory / "var"),
            "MIRO_TOKEN_RATE": BENCH_TOKEN_RATE,
            **(env or {}),
        }
        running = Stack(directory, server, sandbox, environ)
        try:
            yield running
        finally:
            running.close()
    finally:
        sandbox.stop()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


class Service(ServiceProcesses):
    """The Procfile's ``worker`` and ``beat`` as real processes, logging to files."""

    def worker(
        self, concurrency: int | None = None, name: str = "w1", app: str = "worker"
    ) -> psutil.Process:
        """A worker as the Procfile runs it (threads pool, ``-l INFO``); waits until ready."""
        size = concurrency or int(self.env.get("WORKER_CONCURRENCY", "0")) or None
        options = ["--concurrency", str(size)] if size else []
        command = ["celery", "-A", app, "worker", "-n", f"{name}@%h", "-l", "INFO"]
        self._start(name, *command, *options)
        wait_until(lambda: " ready." in self.log(name), 60, f"worker {name} to start")
        return psutil.Process(self.processes[name].pid)

    def beat(self, name: str = "beat") -> None:
        self._start(name, "celery", "-A", "worker", "beat", "-l", "INFO")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str) -> None:
        """SIGTERM (running rotations finish and commit), SIGKILL after 60 s."""
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)


@contextmanager
def service(running: Stack, **env: str) -> Iterator[Service]:
    """Service processes against ``running``; stopped (gracefully) on exit."""
    processes = Service({**running.env, **env}, running.directory / "logs")
    try:
        yield processes
    finally:
        processes.stop_all()


def probe(running: Stack, *arguments: str, env: dict[str, str] | None = None) -> Any:
    """Run ``python -m bench.probe ARGUMENTS`` in a fresh process; its JSON answer."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.probe", *arguments],
        env={**os.environ, **running.env, **(env or {}), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"bench.probe {arguments[0]} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def cpu_seconds(process: psutil.Process, *, children: bool = True) -> float:
    """User plus system CPU time of a process (and its children), as the kernel counts it."""
    total = 0.0
    for member in [process, *(process.children(recursive=True) if children else [])]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, all processes)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@dataclass
class Window:
    """CPU spent by some processes over a measurement, and by everything else on the machine.

    Other engineers run tests on this 2-core machine while the benchmarks run; a figure taken
    while others used a large share of the CPU is marked disturbed so it can be repeated.
    """

    processes: dict[str, psutil.Process]
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    machine: float = 0.0

    def __enter__(self) -> Window:
        self.seconds = -time.perf_counter()
        self.cpu = {name: -self._cpu(process) for name, process in self.processes.items()}
        self.machine = -busy_cpu_seconds()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds += time.perf_counter()
        for name, process in self.processes.items():
            self.cpu[name] += self._cpu(process)
        self.machine += busy_cpu_seconds()

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        """The process alone when it is this one: its children are measured by name."""
        return cpu_seconds(process, children=process.pid != os.getpid())

    @property
    def others(self) -> float:
        """Cores' worth of CPU used by processes outside the benchmark during the window."""
        return max(0.0, self.machine - sum(self.cpu.values())) / self.seconds

    @property
    def disturbed(self) -> bool:
        return self.others > DISTURBED_CORES
