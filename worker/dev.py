"""``python -m worker dev``: the whole service on one machine, for a first look.

Starts the embedded Redis, the Miro sandbox when no Miro app is configured (with short token
lifetimes and a few connected users, so rotations show up in Flower within minutes), and then
the processes of the Procfile: worker, beat, Flower and the web app.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from settings import Settings
from worker.sandbox import Sandbox, SandboxConfig
from worker.vault import Vault, redis_url

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_CLIENT_ID = "3458764500000000000"
SANDBOX_PORT = 8765
#: Short lifetimes so that a rotation happens every couple of minutes.
SANDBOX_ACCESS_TTL = 180
SANDBOX_ACCESS_MARGIN = 60
DEMO_USERS = 5

PROCESSES = {
    "worker": ["-m", "celery", "-A", "worker", "worker", "-l", "INFO"],
    "beat": ["-m", "celery", "-A", "worker", "beat", "-l", "INFO"],
    "flower": ["-m", "worker", "flower"],
    "web": ["-m", "worker", "web"],
}


def _sandbox_environment(sandbox: Sandbox, client_secret: str) -> dict[str, str]:
    return {
        "MIRO_CLIENT_ID": SANDBOX_CLIENT_ID,
        "MIRO_CLIENT_SECRET": client_secret,
        "MIRO_REDIRECT_URI": "http://127.0.0.1:5000/oauth/callback",
        "MIRO_API_URL": sandbox.url,
        "MIRO_AUTH_URL": sandbox.url,
        "ACCESS_REFRESH_MARGIN": str(SANDBOX_ACCESS_MARGIN),
        "SCAN_INTERVAL": "5",
        # Above HTTP_TIMEOUT + COMMIT_RETRY_SECONDS, and short enough for the margin to leave
        # room for a retry after a worker died mid-call (settings.py: recovery_seconds).
        "LOCK_TTL": "35",
    }


def _start_sandbox(client_secret: str) -> Sandbox:
    config = SandboxConfig(
        client_id=SANDBOX_CLIENT_ID, client_secret=client_secret, access_ttl=SANDBOX_ACCESS_TTL
    )
    return Sandbox(config, port=SANDBOX_PORT).start()


def run(settings: Settings) -> int:
    environment = dict(os.environ)
    sandbox = None
    if settings.miro_client_id is None:
        client_secret = secrets.token_urlsafe(24)
        sandbox = _start_sandbox(client_secret)
        environment.update(_sandbox_environment(sandbox, client_secret))
        log.warning("no Miro app configured: using the sandbox at %s", sandbox.url)
    environment["REDIS_URL"] = redis_url(settings)
    settings = Settings.from_env(environment)
    if sandbox is not None:
        _seed_demo_users(Vault.from_settings(settings), sandbox)
    children = {
        name: subprocess.Popen([sys.executable, *arguments], env=environment, cwd=ROOT)
        for name, arguments in PROCESSES.items()
    }
    print(
        "Web page: http://127.0.0.1:5000   Flower: http://127.0.0.1:5555   "
        "(Ctrl-C stops everything)",
        flush=True,
    )
    try:
        _wait(children)
    finally:
        for child in children.values():
            child.send_signal(signal.SIGTERM)
        for child in children.values():
            child.wait(timeout=60)
        if sandbox is not None:
            sandbox.stop()
    return 0


def _seed_demo_users(vault: Vault, sandbox: Sandbox) -> None:
    """Connect a few sandbox users; those of an earlier run died with its sandbox."""
    for stale in list(vault.store.ids()):
        vault.store.delete(stale)
    for response in sandbox.create_grants(DEMO_USERS):
        vault.import_response(response)


def _wait(children: dict[str, subprocess.Popen[bytes]]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            for name, child in children.items():
                if child.poll() is not None:
                    log.error("%s exited with %s; stopping", name, child.returncode)
                    return
            time.sleep(0.5)
    except KeyboardInterrupt:
        return
