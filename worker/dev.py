"""``python -m worker dev`` (``make run``): the whole service on one machine.

With no Miro app configured it runs the demo: a Redis and a Miro sandbox of its own (short
token lifetimes and a few connected users, so rotations show up in Flower within minutes),
every file of theirs in DATA_DIR/demo (see :mod:`worker.demo`), and the Procfile's
processes against them. It touches no store it did not create. With an app configured, it
runs the Procfile's processes against the configured store, and adds or deletes nothing.

Every process is a child of this one, in a session of its own: a Ctrl-C in the terminal
reaches this process alone, which stops them in order (the Procfile's processes, then the
sandbox, then Redis), so none of them sees another vanish and logs it as an error.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import redis

from settings import Settings
from worker import demo
from worker.crypto import KEY_FILE_NAME, generate_key
from worker.redis_server import RedisServer
from worker.sandbox import Sandbox, SandboxConfig
from worker.vault import Vault, redis_url
from worker.web.state import SECRET_FILE_NAME

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_CLIENT_ID = "3458764500000000000"
#: Short lifetimes so that a rotation happens every couple of minutes.
SANDBOX_ACCESS_TTL = 180
SANDBOX_ACCESS_MARGIN = 60
DEMO_USERS = 5
#: Seconds a process has to stop after SIGTERM (a worker finishes its rotations) before SIGKILL.
STOP_TIMEOUT = 60.0
#: Seconds between two looks at whether a process exited.
POLL_INTERVAL = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Processes = dict[str, subprocess.Popen[bytes]]


@dataclass(frozen=True)
class Ports:
    """The ports the demo listens on, all on 127.0.0.1."""

    web: int
    flower: int
    sandbox: int
    redis: int


def run(settings: Settings, ports: Ports) -> int:
    """Run until Ctrl-C, SIGTERM or SIGHUP (exit status 0) or a process's own exit (1).

    Raises:
        DemoError: the demo cannot start (REDIS_URL set, a port in use, a demo running).
        SettingsError: a Miro app is half configured.
    """
    start = _start_demo if settings.miro_client_id is None else _start_with_app
    stack = ExitStack()
    with _on_signals(_interrupt):
        try:
            watched = start(stack, settings, ports)
            name, code = _first_to_exit(watched)
            log.error("%s exited with %s; stopping everything", name, code)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            with _on_signals(signal.SIG_IGN):  # a second Ctrl-C must not strand Redis
                stack.close()


def _start_demo(stack: ExitStack, settings: Settings, ports: Ports) -> Processes:
    if settings.redis_url:
        raise demo.DemoError(
            "REDIS_URL is set, and the demo touches no store it did not create: it runs a "
            "Redis of its own. Unset REDIS_URL to run the demo; or set MIRO_CLIENT_ID, "
            "MIRO_CLIENT_SECRET and MIRO_REDIRECT_URI to run the service with your Miro app "
            "against that Redis"
        )
    _check_free(
        {
            "--port": ports.web,
            "--flower-port": ports.flower,
            "--sandbox-port": ports.sandbox,
            "--redis-port": ports.redis,
        }
    )
    directory = demo.demo_dir(settings.data_dir)
    stack.enter_context(demo.held(directory))
    RedisServer.embedded(directory, ports.redis).stop()  # one a demo killed outright left running
    demo.empty(directory)
    redis_server = stack.enter_context(_own_redis(directory, ports.redis))
    client_secret = secrets.token_urlsafe(24)
    sandbox = _start_sandbox(client_secret, ports.sandbox)
    stack.callback(sandbox.stop)
    log.warning(
        "no Miro app configured: running the demo, against the Miro sandbox at %s, with its "
        "data in %s",
        sandbox.url,
        directory,
    )
    variables = {
        "DATA_DIR": str(directory),
        "REDIS_URL": redis_server.url,
        "MIRO_CLIENT_ID": SANDBOX_CLIENT_ID,
        "MIRO_REDIRECT_URI": f"http://127.0.0.1:{ports.web}/oauth/callback",
        "MIRO_API_URL": sandbox.url,
        "MIRO_AUTH_URL": sandbox.url,
        "ACCESS_REFRESH_MARGIN": str(SANDBOX_ACCESS_MARGIN),
        "SCAN_INTERVAL": "5",
        # Above HTTP_TIMEOUT + COMMIT_RETRY_SECONDS, and short enough for the margin to leave
        # room for a retry after a worker died mid-call (settings.py: recovery_seconds).
        "LOCK_TTL": "35",
        **_secret_files(directory, client_secret),
    }
    demo.write_environment(directory, variables)
    environment = {**demo.without_configuration(os.environ), **variables}
    _connect_users(Settings.from_env(environment), sandbox)
    children = _start_children(stack, environment, ports)
    _print_addresses(ports)
    print(
        f"The Miro sandbox: {sandbox.url}. In another terminal, add --demo to any command: "
        f"{_command('list')}",
        flush=True,
    )
    assert redis_server.process is not None
    return {"redis": redis_server.process, **children}


def _start_with_app(stack: ExitStack, settings: Settings, ports: Ports) -> Processes:
    settings.require_miro_app()
    _check_free({"--port": ports.web, "--flower-port": ports.flower})
    if settings.redis_url is None:
        embedded = RedisServer.embedded(settings.data_dir, settings.embedded_redis_port)
        if not embedded.ping():
            redis_url(settings)  # starts it; it stops with the rest
            stack.callback(embedded.stop)
    # DATA_DIR made absolute: the children run from the project's directory.
    environment = {**os.environ, "DATA_DIR": str(settings.data_dir)}
    children = _start_children(stack, environment, ports)
    _print_addresses(ports)
    return children


def _check_free(ports: dict[str, int]) -> None:
    """Refuse to start, naming the option, rather than let a process die on a port in use."""
    if len(set(ports.values())) < len(ports):
        raise demo.DemoError(f"{', '.join(ports)} each need a port of their own")
    for option, port in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                raise demo.DemoError(
                    f"port {port} on 127.0.0.1 is in use: stop what listens there, or choose "
                    f"another port with {option}"
                ) from None


@contextmanager
def _own_redis(directory: Path, port: int) -> Iterator[RedisServer]:
    """A Redis in ``directory`` for the demo alone, stopped with it (never daemonized)."""
    server = RedisServer.embedded(directory, port).start()
    try:
        _check_answered_by(server)
        yield server
    finally:
        server.stop()


def _check_answered_by(server: RedisServer) -> None:
    """Make sure the Redis that answers is the one just started, and no other store."""
    assert server.process is not None
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        answering = client.info("server").get("process_id")
    finally:
        client.close()
    if answering != server.process.pid:
        raise demo.DemoError(
            f"another Redis answers on 127.0.0.1:{server.port}: stop it, or choose another "
            "port with --redis-port"
        )


def _secret_files(directory: Path, client_secret: str) -> dict[str, str]:
    """The demo's secrets, each in a file of its own that a setting names."""
    return {
        "MIRO_CLIENT_SECRET_FILE": demo.write_private(directory / "client-secret", client_secret),
        "TOKEN_ENCRYPTION_KEYS_FILE": demo.write_private(directory / KEY_FILE_NAME, generate_key()),
        "WEB_SECRET_KEY_FILE": demo.write_private(
            directory / SECRET_FILE_NAME, secrets.token_urlsafe(32)
        ),
    }


def _start_sandbox(client_secret: str, port: int) -> Sandbox:
    config = SandboxConfig(
        client_id=SANDBOX_CLIENT_ID, client_secret=client_secret, access_ttl=SANDBOX_ACCESS_TTL
    )
    return Sandbox(config, port=port).start()


def _connect_users(settings: Settings, sandbox: Sandbox) -> None:
    """Connect a few sandbox users, as if each had installed the app."""
    vault = Vault.from_settings(settings)
    try:
        vault.import_many(sandbox.create_grants(DEMO_USERS))
    finally:
        vault.redis.close()


def _procfile(ports: Ports) -> dict[str, list[str]]:
    """The Procfile's processes, as arguments to this Python."""
    return {
        "worker": ["-m", "celery", "-A", "worker", "worker", "-l", "INFO"],
        "beat": ["-m", "celery", "-A", "worker", "beat", "-l", "INFO"],
        "flower": ["-m", "worker", "flower", "--port", str(ports.flower)],
        "web": ["-m", "worker", "web", "--port", str(ports.web)],
    }


def _start_children(stack: ExitStack, environment: dict[str, str], ports: Ports) -> Processes:
    children: Processes = {}
    stack.callback(_stop, children)  # first, so that an interrupted start stops what it began
    for name, arguments in _procfile(ports).items():
        children[name] = subprocess.Popen(
            [sys.executable, *arguments], env=environment, cwd=ROOT, start_new_session=True
        )
    return children


def _stop(children: Processes) -> None:
    """SIGTERM to every child, then wait for each; one that hangs is killed."""
    for process in children.values():
        if process.poll() is None:
            process.terminate()
    for name, process in children.items():
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %g s of SIGTERM: killed", name, STOP_TIMEOUT)
            process.kill()
            process.wait()


def _first_to_exit(processes: Processes) -> tuple[str, int]:
    """Wait until one of ``processes`` exits; its name and exit status."""
    while True:
        for name, process in processes.items():
            code = process.poll()
            if code is not None:
                return name, code
        time.sleep(POLL_INTERVAL)


def _print_addresses(ports: Ports) -> None:
    print(
        f"Web page: http://127.0.0.1:{ports.web}   Flower: http://127.0.0.1:{ports.flower}   "
        "(Ctrl-C stops everything)",
        flush=True,
    )


def _command(*arguments: str) -> str:
    """The command line that runs ``python -m worker --demo ARGUMENTS`` from here."""
    try:
        python = str(Path(sys.executable).relative_to(Path.cwd()))
    except ValueError:
        python = "python"
    data_dir = os.environ.get("DATA_DIR")
    prefix = f"DATA_DIR={shlex.quote(data_dir)} " if data_dir else ""
    return f"{prefix}{python} -m worker --demo {shlex.join(arguments)}"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _on_signals(handler: Callable[[int, FrameType | None], Any] | int) -> Iterator[None]:
    """``handler`` for Ctrl-C, SIGTERM and SIGHUP while inside; the previous ones after."""
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
