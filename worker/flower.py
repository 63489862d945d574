"""Flower with the service's safe defaults, whichever way it is started.

``python -m worker flower`` starts Celery's own ``celery -A worker flower``, and both load
worker.celery before Flower's command reads its options: :func:`guard_flower`, called there,
sets these defaults (Flower's command line and its FLOWER_* variables still win):

- it listens on 127.0.0.1, and refuses to start beyond localhost without a login;
- the login comes from the settings, so FLOWER_BASIC_AUTH_FILE works (Flower itself ignores
  it) and no login is put on a command line, which ``ps`` shows every local user;
- its history is kept across a restart, in DATA_DIR;
- it answers only a request for a host it serves: a page on a domain whose DNS answer turns
  into 127.0.0.1 (DNS rebinding) would otherwise read and drive it from the browser. Its
  /healthcheck answers any host, as the web app's /healthz does: probes ask by the machine's
  address, and it has nothing to read or do.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import partial
from typing import Any

from flower import command as flower_command
from flower.app import Flower
from flower.utils import prepend_url
from tornado.httputil import HTTPServerRequest
from tornado.web import ErrorHandler

from settings import Settings
from worker.hosts import LOOPBACK_NAMES, HostAllowlist

DEFAULT_ADDRESS = "127.0.0.1"
HEALTHCHECK = "/healthcheck"


def command_line(address: str, port: int) -> list[str]:
    """Celery's own Flower command, for ``python -m worker flower`` to run in its place."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "flower",
        f"--address={address}",
        f"--port={port}",
    ]


def guard_flower(settings: Settings) -> None:
    """Give Flower's command the service's defaults and its guarded application."""
    options = flower_command.options
    options.address = DEFAULT_ADDRESS
    options.persistent = True
    options.db = str(settings.data_dir / "flower.db")
    if settings.flower_basic_auth:
        options.basic_auth = settings.flower_basic_auth.split(",")  # as Flower splits its own
    allowed = settings.flower_allowed_hosts or ()
    flower_command.Flower = partial(GuardedFlower, allowed_hosts=allowed)


class GuardedFlower(Flower):
    """Flower that needs a login beyond localhost and answers only the hosts it serves."""

    def __init__(self, *, options: Any, allowed_hosts: Iterable[str], **kwargs: Any) -> None:
        if options.address not in LOOPBACK_NAMES and not (options.basic_auth or options.auth):
            raise SystemExit(
                f"error: Flower would listen on {options.address or 'all interfaces'} without "
                "a login: set FLOWER_BASIC_AUTH=user:password (or listen on 127.0.0.1)"
            )
        super().__init__(options=options, **kwargs)
        self.hosts = HostAllowlist.serving(options.address, allowed_hosts)
        prefix = options.url_prefix
        self.healthcheck = prepend_url(HEALTHCHECK, prefix) if prefix else HEALTHCHECK

    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> Any:
        if request.path != self.healthcheck and not self.hosts.allows(request.host):
            return self.get_handler_delegate(request, ForeignHostHandler, {"status_code": 400})
        return super().find_handler(request, **kwargs)


class ForeignHostHandler(ErrorHandler):
    """The answer to a request for a host Flower does not serve, saying how to add one."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.finish(
            "This Flower does not serve the host this request names. To reach it by that "
            "name, add the name to FLOWER_ALLOWED_HOSTS.\n"
        )
