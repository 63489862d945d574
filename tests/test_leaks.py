"""Secrets never leak: the whole flow at DEBUG, everything captured, every secret searched.

Captured: the worker's and beat's DEBUG logs, this process's DEBUG logs, every command Redis
received (MONITOR: the broker's messages and the store's writes as they travel), the task
events Flower would see, the result backend, every Redis value at the end, and what the CLI
printed. Searched for: every access and refresh token the sandbox ever issued, the client
secret and the encryption key. A second flow meets refusals from a sandbox that quotes every
token it receives (``echo_tokens``), and also searches the webhook's posts and the web page.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import requests
from celery import Celery

from settings import Settings
from soak.processes import ServiceProcesses
from tests.conftest import CLIENT_ID, authorize_code, run_cli, wait_for
from tests.test_notify import Hook
from worker.credential import CredentialId
from worker.sandbox import Sandbox, SandboxConfig
from worker.vault import Vault
from worker.web.app import create_app
from worker.web.state import OAuthStates, secret_key

pytestmark = pytest.mark.slow


@pytest.fixture
def sandbox(client_secret: str) -> Iterator[Sandbox]:
    config = SandboxConfig(client_id=CLIENT_ID, client_secret=client_secret, access_ttl=20)
    with Sandbox(config) as running:
        yield running


class Capture:
    """Everything that leaves the service's hands, as text."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.lock = threading.Lock()

    def add(self, value: Any) -> None:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        with self.lock:
            self.chunks.append(text)

    def text(self) -> str:
        with self.lock:
            return "\n".join(self.chunks)


def _monitor(url: str, capture: Capture, stop: threading.Event) -> None:
    """Record every command Redis receives (MONITOR), as the wire carries it."""
    # No read timeout: redis-py's default (5 s) would end the monitor in a quiet moment.
    with redis.Redis.from_url(url, socket_timeout=None).monitor() as monitor:
        for command in monitor.listen():
            capture.add(command["command"])
            if stop.is_set():
                return


def _events(url: str, capture: Capture, stop: threading.Event) -> None:
    """Record the task events Flower would receive."""
    app = Celery(broker=url)
    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": capture.add})
        for _ in receiver.itercapture(limit=None, timeout=None, wakeup=True):
            if stop.is_set():
                return


def _threads(url: str, capture: Capture, stop: threading.Event) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=target, args=(url, capture, stop), daemon=True)
        for target in (_monitor, _events)
    ]
    for thread in threads:
        thread.start()
    return threads


def _result_backend(client: redis.Redis) -> list[bytes]:
    return [client.get(key) or b"" for key in client.scan_iter("celery-task-meta-*")]


def _every_value(client: redis.Redis) -> list[bytes]:
    return [client.dump(key) or b"" for key in client.scan_iter("*")]


def test_no_secret_in_logs_events_broker_results_or_output(
    sandbox: Sandbox,
    vault: Vault,
    env: dict[str, str],
    tmp_path: Path,
    redis_client: redis.Redis,
    client_secret: str,
    encryption_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = env["REDIS_URL"]
    short = {
        "ACCESS_REFRESH_MARGIN": "16",
        "SCAN_INTERVAL": "1",
        "CLAIM_LEASE": "8",
        "LOCK_TTL": "8",
    }
    env = {**env, **short}
    capture, stop = Capture(), threading.Event()
    threads = _threads(url, capture, stop)
    service = ServiceProcesses(env, tmp_path / "logs")
    try:
        service.worker(level="DEBUG")
        service.beat(level="DEBUG")
        service.wait_ready()
        # Connect (Miro's guide, steps 1 and 2) and import.
        connected = vault.exchange(authorize_code(sandbox, vault))
        imported = [vault.import_response(r).id for r in sandbox.create_grants(5)]
        # Scheduled refreshes, then a failure, then a forced rotation and the reports.
        wait_for(lambda: sandbox.stats()["refreshes"] >= 10, timeout=30, message="refreshes")
        sandbox.set_faults(error_rate=1.0)
        wait_for(lambda: sandbox.stats()["errors_injected"] >= 3, timeout=30, message="failures")
        sandbox.set_faults(error_rate=0.0)
        sandbox.revoke_grant(imported[0].team_id, imported[0].user_id)
        outputs = [
            run_cli(env, "rotate", str(connected.id), "--wait"),
            run_cli(env, "rotate", str(imported[0]), "--now"),
            run_cli(env, "status", "--json"),
            run_cli(env, "list", "--json"),
        ]
    finally:
        stop.set()
        redis_client.ping()  # wakes the monitor so it sees the stop
        service.stop_all()
    for thread in threads:
        thread.join(timeout=10)

    for output in outputs:
        capture.add(output.stdout + output.stderr)
    for name in ("w1", "beat"):
        capture.add(service.log_text(name))
    capture.add(caplog.text)
    for value in _result_backend(redis_client) + _every_value(redis_client):
        capture.add(value)
    haystack = capture.text()
    kept_secret = sandbox.issued_tokens() | {client_secret, encryption_key}

    assert len(sandbox.issued_tokens()) > 20  # the flow really ran
    assert "tasks.refresh.rotate" in haystack and "LPUSH" in haystack.upper()
    leaked = sorted(secret[:6] + "…" for secret in kept_secret if secret in haystack)
    assert leaked == []


def _until_refused_and_resumed(sandbox: Sandbox, vault: Vault, ids: list[CredentialId]) -> None:
    """Let scheduled refreshes meet a refused client secret, then let the probe resume."""
    sandbox.set_faults(reject_all_refresh=True)

    def refused() -> bool:
        errors = [vault.store.load(cid).last_error or "" for cid in ids]
        return any("Client authentication failed" in error for error in errors)

    wait_for(refused, timeout=30, message="a scheduled refresh refused")
    sandbox.set_faults(reject_all_refresh=False)
    wait_for(lambda: not vault.rotator.guard.paused(), timeout=30, message="the probe to resume")


def _web_exchange_refused(env: dict[str, str], wrong_secret: str) -> tuple[str, str]:
    """The web page of a callback whose exchange Miro refuses, and the code it carried."""
    vault = Vault.from_settings(Settings.from_env({**env, "MIRO_CLIENT_SECRET": wrong_secret}))
    states = OAuthStates(vault.redis, secret_key(vault.settings))
    authorize = vault.client.authorize_url(states.issue(browser=False).token)
    callback = urlsplit(
        requests.get(authorize, allow_redirects=False, timeout=5).headers["Location"]
    )
    page = create_app(vault).test_client().get(f"{callback.path}?{callback.query}")
    assert page.status_code == 400  # refused: the code or the app, it cannot tell
    return page.text, parse_qs(callback.query)["code"][0]


def test_no_token_a_careless_miro_echoes_in_its_errors_is_kept_logged_or_shown(
    sandbox: Sandbox,
    env: dict[str, str],
    tmp_path: Path,
    redis_client: redis.Redis,
    client_secret: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every refusal quotes the secrets its call carried and both tokens of the grant named."""
    caplog.set_level(logging.DEBUG)
    hook = Hook()
    env = {
        **env,
        "ACCESS_REFRESH_MARGIN": "16",
        "SCAN_INTERVAL": "1",
        "CLAIM_LEASE": "8",
        "LOCK_TTL": "8",
        "PROBE_INTERVAL": "1",
        "NOTIFY_WEBHOOK_URL": hook.url,
    }
    wrong_secret = secrets.token_urlsafe(24)
    vault = Vault.from_settings(Settings.from_env(env))
    ids = [vault.import_response(r).id for r in sandbox.create_grants(4)]
    sandbox.set_faults(echo_tokens=True)
    capture = Capture()
    service = ServiceProcesses(env, tmp_path / "logs")
    try:
        service.worker(level="DEBUG")
        service.beat(level="DEBUG")
        service.wait_ready()
        _until_refused_and_resumed(sandbox, vault, ids)
        sandbox.revoke_grant(ids[1].team_id, ids[1].user_id)
        # Refused: needs_reauth (the webhook) at once if Miro refuses its access token too,
        # else once another refresh has succeeded since.
        forced = run_cli(env, "rotate", str(ids[1]), "--now")
        capture.add(run_cli(env, "rotate", str(ids[3]), "--now").stdout)
        forced_again = run_cli(env, "rotate", str(ids[1]), "--now")
        revoked = run_cli({**env, "MIRO_CLIENT_SECRET": wrong_secret}, "revoke", str(ids[2]))
        page, code = _web_exchange_refused(env, wrong_secret)
        sandbox.set_faults(lose_rate=1.0, lose_mode="502")  # a gateway page quoting a new pair
        capture.add(run_cli(env, "rotate", str(ids[0]), "--now").stdout)
        sandbox.set_faults(lose_rate=0.0)
    finally:
        service.stop_all()
        hook.close()

    for output in (forced, forced_again, revoked):
        capture.add(output.stdout + output.stderr)
    for text in (page, json.dumps(hook.bodies), caplog.text):
        capture.add(text)
    for name in ("w1", "beat"):
        capture.add(service.log_text(name))
    for value in _result_backend(redis_client) + _every_value(redis_client):
        capture.add(value)
    haystack = capture.text()
    kept_secret = sandbox.issued_tokens() | {client_secret, wrong_secret, code}

    assert "Client authentication failed" in revoked.stderr  # every refusal really happened
    assert "needs_reauth" in json.dumps(hook.bodies) and "Invalid refresh token" in haystack
    assert "Miro refused the code" in page
    leaked = sorted(secret[:6] + "…" for secret in kept_secret if secret in haystack)
    assert leaked == []
    assert "(tokens: ***" in revoked.stderr  # Miro's message, its echo scrubbed
    assert "a body of" in haystack  # the 502 page, kept as its size alone
