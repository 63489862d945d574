"""Notifications of state changes: the webhook over real HTTP, and the Celery signal."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet

from settings import Settings
from tasks.signals import credential_state_changed, send_state_changed
from tests.conftest import authorize_code, free_port, wait_for
from worker.credential import Credential, State
from worker.outcomes import Outcome
from worker.sandbox import Sandbox
from worker.vault import Vault


class Hook:
    """A real HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def hook() -> Iterator[Hook]:
    running = Hook()
    yield running
    running.close()


def _vault_with_webhook(env: dict[str, str], url: str) -> Vault:
    return Vault.from_settings(Settings.from_env({**env, "NOTIFY_WEBHOOK_URL": url}))


@pytest.fixture
def notifying(env: dict[str, str], hook: Hook, redis_client: redis.Redis) -> Vault:
    return _vault_with_webhook(env, hook.url)


def _connect(sandbox: Sandbox, vault: Vault, user_id: str = "42") -> Credential:
    return vault.exchange(authorize_code(sandbox, vault, user_id=user_id))


def _refuse(sandbox: Sandbox, vault: Vault, credential: Credential) -> None:
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)
    assert vault.rotate_now(credential.id).outcome is Outcome.NEEDS_REAUTH


def test_a_refused_credential_is_posted_once(
    sandbox: Sandbox, notifying: Vault, hook: Hook
) -> None:
    credential = _connect(sandbox, notifying)
    _refuse(sandbox, notifying, credential)
    assert notifying.rotate_now(credential.id).outcome is Outcome.NEEDS_REAUTH  # still refused

    assert len(hook.bodies) == 1
    body = hook.bodies[0]
    assert set(body) == {"credential", "state", "error"}
    assert body["credential"] == str(credential.id)
    assert body["state"] == "needs_reauth"
    assert "refused" in body["error"]


def test_no_post_for_a_plain_rotation(sandbox: Sandbox, notifying: Vault, hook: Hook) -> None:
    credential = _connect(sandbox, notifying)
    assert notifying.rotate_now(credential.id).outcome is Outcome.ROTATED
    assert hook.bodies == []


def test_a_reconnect_after_a_refusal_posts_the_recovery(
    sandbox: Sandbox, notifying: Vault, hook: Hook
) -> None:
    credential = _connect(sandbox, notifying, user_id="42")
    _refuse(sandbox, notifying, credential)

    again = _connect(sandbox, notifying, user_id="42")

    assert again.id == credential.id and again.state is State.ACTIVE
    wait_for(lambda: len(hook.bodies) >= 2, 1, "the recovery POST")
    assert [body["state"] for body in hook.bodies] == ["needs_reauth", "active"]
    assert hook.bodies[1]["credential"] == str(credential.id)
    assert hook.bodies[1]["error"] is None


def test_a_rotation_out_of_undecryptable_posts_active(
    sandbox: Sandbox, env: dict[str, str], notifying: Vault, hook: Hook
) -> None:
    other_key = Fernet.generate_key().decode()
    owner = _vault_with_webhook({**env, "TOKEN_ENCRYPTION_KEYS": other_key}, hook.url)
    credential = owner.import_response(sandbox.create_grants(1)[0])
    assert notifying.rotate_now(credential.id).outcome is Outcome.UNREADABLE  # the wrong key

    assert owner.rotate_now(credential.id).outcome is Outcome.ROTATED  # the right key is back

    assert hook.bodies == [{"credential": str(credential.id), "state": "active", "error": None}]


def _unreachable_url() -> str:
    return f"http://127.0.0.1:{free_port()}/hook"


def test_a_webhook_that_is_down_does_not_break_the_rotation(
    sandbox: Sandbox, env: dict[str, str], redis_client: redis.Redis
) -> None:
    vault = _vault_with_webhook(env, _unreachable_url())
    credential = _connect(sandbox, vault)
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)

    result = vault.rotate_now(credential.id)

    assert result.outcome is Outcome.NEEDS_REAUTH
    assert vault.store.load(credential.id).state is State.NEEDS_REAUTH


def test_a_webhook_answering_500_does_not_break_the_rotation(
    sandbox: Sandbox, notifying: Vault, hook: Hook
) -> None:
    hook.status = 500
    credential = _connect(sandbox, notifying)
    other = _connect(sandbox, notifying, user_id="43")
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)

    result = notifying.rotate_now(credential.id)

    assert result.outcome is Outcome.NEEDS_REAUTH
    assert len(hook.bodies) == 1  # it was called, and its 500 was swallowed
    assert notifying.store.load(credential.id).state is State.NEEDS_REAUTH
    assert notifying.rotate_now(other.id).outcome is Outcome.ROTATED


class Received:
    """A receiver of the Celery signal, kept referenced while connected."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, sender: Any = None, **kwargs: Any) -> None:
        kwargs.pop("signal", None)
        self.calls.append(kwargs)


@pytest.fixture
def received() -> Iterator[Received]:
    receiver = Received()
    credential_state_changed.connect(receiver, weak=False)
    yield receiver
    credential_state_changed.disconnect(receiver)


def test_the_celery_signal_carries_the_state_change(
    sandbox: Sandbox, settings: Settings, redis_client: redis.Redis, received: Received
) -> None:
    vault = Vault.from_settings(settings)
    vault.listeners.append(send_state_changed)
    credential = _connect(sandbox, vault)
    assert vault.rotate_now(credential.id).outcome is Outcome.ROTATED
    assert received.calls == []

    _refuse(sandbox, vault, credential)

    assert len(received.calls) == 1
    call = received.calls[0]
    assert set(call) == {"credential", "old", "new", "error"}
    assert (call["credential"], call["old"], call["new"]) == (
        str(credential.id),
        "active",
        "needs_reauth",
    )
    assert "refused" in call["error"]
