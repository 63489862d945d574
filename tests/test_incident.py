"""Incidents: what the refusals of several credentials have in common pauses refreshing; one
credential's refusals cost that credential alone, and an app-level fault marks nobody dead."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from settings import Settings
from tests.conftest import CLIENT_ID, EVERY_DIALECT, wait_for
from worker.constants import PAUSED_KEY, REFUSED_KEY
from worker.credential import Credential, CredentialId, State
from worker.evidence import Evidence
from worker.incident import IncidentGuard
from worker.outcomes import Outcome
from worker.sandbox import Sandbox, SandboxConfig
from worker.scan import Scanner
from worker.vault import Vault

DEAD, ALIVE, NONE = Evidence.GRANT_DEAD, Evidence.GRANT_ALIVE, Evidence.NONE


@pytest.fixture
def guard(redis_client: redis.Redis) -> IncidentGuard:
    return IncidentGuard(redis_client, app="test-app", probe_interval=1)


def _refuse(guard: IncidentGuard, evidence: Evidence, *credential_ids: str) -> str | None:
    """Record a refusal of each credential; why refreshing is paused after the last."""
    readings = [guard.record_refusal(cid, evidence) for cid in credential_ids]
    return readings[-1].paused


def test_pause_keeps_the_first_reason_until_resumed(guard: IncidentGuard) -> None:
    assert guard.paused() is None
    guard.pause("first")
    guard.pause("second")
    assert guard.paused() == "first"
    assert guard.resume() is True
    assert guard.paused() is None
    assert guard.resume() is False


@pytest.mark.parametrize("evidence", [DEAD, ALIVE, NONE])
def test_one_credential_refused_again_and_again_never_pauses(
    guard: IncidentGuard, evidence: Evidence
) -> None:
    assert _refuse(guard, evidence, *["1:a"] * 10) is None
    assert guard.paused() is None


def test_two_credentials_whose_grants_live_pause(guard: IncidentGuard) -> None:
    assert _refuse(guard, ALIVE, "1:a") is None
    reason = _refuse(guard, ALIVE, "1:b")
    assert reason is not None and "still honours" in reason and "MIRO_CLIENT_ID" in reason
    assert guard.paused() == reason


@pytest.mark.parametrize("evidence", [DEAD, NONE])
def test_three_credentials_refused_with_no_success_between_pause(
    guard: IncidentGuard, evidence: Evidence
) -> None:
    assert _refuse(guard, evidence, "1:a", "1:b") is None
    reason = _refuse(guard, evidence, "1:c")
    assert reason is not None and "3 credentials with no success" in reason


def test_a_success_between_refusals_resets_the_count(guard: IncidentGuard) -> None:
    _refuse(guard, DEAD, "1:a", "1:b")
    guard.record_success()
    assert _refuse(guard, DEAD, "1:c", "1:d") is None
    _refuse(guard, ALIVE, "1:e")
    guard.record_success()
    assert _refuse(guard, ALIVE, "1:f") is None


def test_a_success_resumes_and_is_counted_for_its_app_only(
    guard: IncidentGuard, redis_client: redis.Redis
) -> None:
    other_app = IncidentGuard(redis_client, app="another-secret")
    _refuse(guard, ALIVE, "1:a", "1:b")
    before = time.time()

    other_app.record_success(2)

    assert guard.paused() is None  # any success proves Miro works for someone
    assert (guard.successes(), other_app.successes()) == (0, 2)
    assert guard.last_success_at() is None
    at = other_app.last_success_at()
    assert at is not None and before <= at <= time.time()


def test_a_success_is_recent_within_the_window_and_until_an_incident(
    redis_client: redis.Redis,
) -> None:
    now = [1_800_000_000.0]
    guard = IncidentGuard(redis_client, window=600, clock=lambda: now[0])
    assert guard.success_lately() is None
    guard.record_success()
    now[0] += 600
    assert guard.success_lately() == 1_800_000_000.0
    now[0] += 1
    assert guard.success_lately() is None
    guard.record_success()
    guard.pause("an incident since")
    assert guard.success_lately() is None


def test_refusals_further_apart_than_the_window_do_not_add_up(redis_client: redis.Redis) -> None:
    guard = IncidentGuard(redis_client, window=1)
    _refuse(guard, NONE, "1:a", "1:b")
    wait_for(lambda: not redis_client.exists(REFUSED_KEY), 5, "the window to pass")
    assert _refuse(guard, NONE, "1:c") is None


def test_a_resume_by_hand_forgives_the_refusals_counted(guard: IncidentGuard) -> None:
    assert _refuse(guard, ALIVE, "1:a", "1:b") is not None
    guard.resume()
    assert _refuse(guard, NONE, "1:c") is None


def test_a_refusal_reads_the_successes_so_far(guard: IncidentGuard) -> None:
    guard.record_success(3)
    assert guard.record_refusal("1:a", NONE).successes == 3


def test_a_probe_is_granted_once_per_interval(guard: IncidentGuard) -> None:
    granted: list[bool] = []
    barrier = threading.Barrier(16)

    def take() -> None:
        barrier.wait()
        granted.append(guard.take_probe())

    threads = [threading.Thread(target=take) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    started = time.monotonic()

    assert sorted(granted) == [False] * 15 + [True]
    assert guard.take_probe() is False
    wait_for(guard.take_probe, 5, "the next probe interval")
    assert time.monotonic() - started > 0.5
    assert guard.take_probe() is False


def test_a_reading_may_be_reused_only_within_max_age(
    guard: IncidentGuard, redis_client: redis.Redis
) -> None:
    assert guard.paused(max_age=60) is None  # read now, kept
    IncidentGuard(redis_client).pause("paused by another process")

    assert guard.paused(max_age=60) is None  # the old reading, within its age
    assert guard.paused() == "paused by another process"  # a fresh one
    guard.resume()
    assert guard.paused(max_age=60) is None  # its own resume is seen at once
    guard.pause("here")
    assert guard.paused(max_age=60) == "here"  # and its own pause


# Through the vault, against the sandbox in each of its dialects.


def _due_credentials(sandbox: Sandbox, vault: Vault, count: int = 1) -> list[Credential]:
    """Stored credentials whose access tokens are about to expire: the scan would pick them.

    At the sandbox the tokens live an hour: Miro still honours them.
    """
    responses = [{**r, "expires_in": 120} for r in sandbox.create_grants(count)]
    credentials = vault.import_many(responses)
    assert all(vault.policy.is_due(c, time.time()) for c in credentials)
    return credentials


class _Ahead:
    """A clock an hour ahead: every stored access token has expired, no witness is left."""

    def __call__(self) -> float:
        return time.time() + 3600


@EVERY_DIALECT
def test_a_scheduled_refusal_is_confirmed_once_before_needs_reauth(
    sandbox: Sandbox, vault: Vault
) -> None:
    [credential] = _due_credentials(sandbox, vault)
    changes: list[Any] = []
    vault.listeners.append(changes.append)
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)

    before = time.time()
    first = vault.rotator.rotate(credential.id)

    assert first.outcome is Outcome.RESCHEDULED
    stored = vault.store.load(credential.id)
    assert stored.state is State.ACTIVE and stored.refusals == 1
    due = vault.store.due_at(credential.id)
    delay = vault.rotator.confirm_delay
    assert due is not None and before + delay - 1 <= due <= time.time() + delay + 1
    assert changes == []

    second = vault.rotator.rotate(credential.id)

    assert second.outcome is Outcome.NEEDS_REAUTH
    stored = vault.store.load(credential.id)
    assert stored.state is State.NEEDS_REAUTH and "no longer honours" in (stored.last_error or "")
    assert vault.store.due_at(credential.id) is None
    assert [change.new for change in changes] == [State.NEEDS_REAUTH]
    assert sandbox.stats()["token_calls"] == 2


@EVERY_DIALECT
def test_while_paused_a_refusal_never_marks_needs_reauth(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    [credential] = _due_credentials(sandbox, vault)
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)
    vault.rotator.guard.pause("test incident")

    results = [vault.rotate_now(credential.id) for _ in range(3)]

    assert [result.outcome for result in results] == [Outcome.PAUSED] * 3
    assert sandbox.stats()["token_calls"] == 3  # forced: the refusal was real, the verdict held
    stored = vault.store.load(credential.id)
    assert stored.state is State.ACTIVE
    assert redis_client.get(PAUSED_KEY) == b"test incident"
    # Backed off, not put back at its due time: the next probe picks another credential.
    assert results[-1].retry_at is not None and results[-1].retry_at > time.time()


def test_while_paused_a_scheduled_rotation_does_not_call_miro(
    sandbox: Sandbox, vault: Vault
) -> None:
    [credential] = _due_credentials(sandbox, vault)
    vault.rotator.guard.pause("test incident")
    calls = sandbox.stats()["token_calls"]

    result = vault.rotator.rotate(credential.id)

    assert result.outcome is Outcome.PAUSED
    assert result.detail == "test incident"
    assert sandbox.stats()["token_calls"] == calls
    assert vault.store.load(credential.id) == credential
    assert result.retry_at is not None
    assert vault.store.due_at(credential.id) == pytest.approx(result.retry_at)


def _with_wrong_secret(env: dict[str, str], **settings: str) -> Vault:
    return Vault.from_settings(
        Settings.from_env({**env, "MIRO_CLIENT_SECRET": "not-the-secret", **settings})
    )


@EVERY_DIALECT
@pytest.mark.parametrize("access", ["alive", "expired"])
def test_a_wrong_client_secret_pauses_and_marks_nobody(
    sandbox: Sandbox, vault: Vault, env: dict[str, str], access: str
) -> None:
    credentials = _due_credentials(sandbox, vault, 4)
    wrong = _with_wrong_secret(env)
    if access == "expired":
        wrong.rotator.clock = _Ahead()

    scheduled = wrong.rotator.rotate_due([c.id for c in credentials])
    forced = [wrong.rotate_now(c.id).outcome for c in credentials]

    assert Outcome.NEEDS_REAUTH not in [r.outcome for r in scheduled] + forced
    assert scheduled[-1].outcome is Outcome.PAUSED and set(forced) == {Outcome.PAUSED}
    assert wrong.rotator.guard.paused() is not None
    assert {vault.store.load(c.id).state for c in credentials} == {State.ACTIVE}
    # The secret is fixed: the first success resumes, and every pair still works.
    assert [vault.rotate_now(c.id).outcome for c in credentials] == [Outcome.ROTATED] * 4
    assert vault.rotator.guard.paused() is None


@EVERY_DIALECT
def test_one_credential_of_a_wrong_secret_backs_off_unmarked(
    sandbox: Sandbox, vault: Vault, env: dict[str, str]
) -> None:
    [credential] = _due_credentials(sandbox, vault)
    wrong = _with_wrong_secret(env)

    results = [wrong.rotate_now(credential.id) for _ in range(3)]

    assert [result.outcome for result in results] == [Outcome.RESCHEDULED] * 3
    assert "still honours the access token" in (results[-1].detail or "")
    stored = vault.store.load(credential.id)
    assert stored.state is State.ACTIVE and stored.failure_count == 3
    assert wrong.rotator.guard.paused() is None  # one credential never pauses the fleet


@EVERY_DIALECT
def test_a_fleet_of_one_in_keepalive_with_a_wrong_secret_is_never_marked(
    sandbox: Sandbox, vault: Vault, env: dict[str, str]
) -> None:
    [credential] = _due_credentials(sandbox, vault)
    wrong = _with_wrong_secret(env, REFRESH_POLICY="keepalive", REFUSAL_CONFIRM_DELAY="0")
    wrong.rotator.clock = _Ahead()  # its access token has expired: nothing can witness

    outcomes = []
    for _ in range(3):
        outcomes.append(wrong.rotator.rotate(credential.id, before_use=True).outcome)
        outcomes.append(wrong.rotate_now(credential.id).outcome)

    assert Outcome.NEEDS_REAUTH not in outcomes
    stored = vault.store.load(credential.id)
    assert stored.state is State.ACTIVE
    assert "no refresh has succeeded since its first refusal" in (stored.last_error or "")
    assert sandbox.stats()["token_calls"] == 6


@EVERY_DIALECT
def test_without_a_witness_a_refusal_is_confirmed_by_a_success_elsewhere(
    sandbox: Sandbox, vault: Vault
) -> None:
    left, stays = _due_credentials(sandbox, vault, 2)
    sandbox.revoke_grant(left.id.team_id, left.id.user_id)
    vault.rotator.clock = _Ahead()

    assert vault.rotate_now(left.id).outcome is Outcome.RESCHEDULED  # the app may be at fault
    assert vault.rotate_now(left.id).outcome is Outcome.RESCHEDULED  # still nothing proves it
    assert vault.rotate_now(stays.id).outcome is Outcome.ROTATED  # the app works
    assert vault.rotate_now(left.id).outcome is Outcome.NEEDS_REAUTH


# The scenario: every refusal worded alike, short tokens, two users leave.

FLEET = 16
SHORT_TTL = 12


@pytest.fixture
def uniform_sandbox(client_secret: str) -> Iterator[Sandbox]:
    """Access tokens of 12 s, refreshed 9 s before they expire: every 3 s or so."""
    config = SandboxConfig(CLIENT_ID, client_secret, access_ttl=SHORT_TTL, dialect="uniform")
    with Sandbox(config) as running:
        yield running


class _Service:
    """The scan and the rotations of a worker, in a thread of the test: the real Scanner and
    Rotator, without Celery's processes in between."""

    def __init__(self, vault: Vault, sandbox: Sandbox) -> None:
        self.vault, self.sandbox = vault, sandbox
        settings = vault.settings
        self.scanner = Scanner(
            vault.redis,
            vault.rotator.guard,
            batch=100,
            lease=settings.claim_lease,
            start_rate=settings.miro_token_rate,
        )
        self.expired: set[str] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def __enter__(self) -> _Service:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while not self.stopping.wait(0.2):
            self.scanner.tick(self._rotate, self._probe)
            now = time.time()
            self.expired |= {
                f"{g['team_id']}:{g['user_id']}"
                for g in self.sandbox.grants()
                if not g["revoked"] and g["access_expires_at"] <= now
            }

    def _rotate(self, ids: Any) -> None:
        self.vault.rotator.rotate_due([CredentialId.parse(i) for i in ids])

    def _probe(self, ids: Any) -> None:
        for credential_id in ids:
            self.vault.rotate_now(CredentialId.parse(credential_id))


def test_two_users_who_remove_the_app_cost_their_own_credentials_alone(
    uniform_sandbox: Sandbox, env: dict[str, str], redis_client: redis.Redis
) -> None:
    sandbox = uniform_sandbox
    settings = {
        "MIRO_API_URL": sandbox.url,
        "ACCESS_REFRESH_MARGIN": "9",
        "HTTP_TIMEOUT": "2",
        # Short enough for a 9 s margin to leave room for a retry after a worker died.
        "SCAN_INTERVAL": "0.5",
        "CLAIM_LEASE": "4",
        "LOCK_TTL": "4.5",
    }
    vault = Vault.from_settings(Settings.from_env({**env, **settings}))
    vault.rotator.confirm_delay = 1.0
    credentials = [vault.import_response(r) for r in sandbox.create_grants(FLEET)]
    leaving = credentials[:2]

    with _Service(vault, sandbox) as service:
        for credential in leaving:
            sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)

        def settled() -> bool:
            rotations = [g["rotations"] for g in sandbox.grants() if not g["revoked"]]
            left = {vault.store.load(c.id).state for c in leaving}
            return min(rotations) >= 3 and left == {State.NEEDS_REAUTH}

        wait_for(settled, 40, "the others to rotate 3 times and the two who left to be marked")

    assert service.expired == set()
    assert vault.rotator.guard.paused() is None
    staying = {str(c.id) for c in credentials[2:]}
    active = {str(i) for i in vault.store.ids() if vault.store.load(i).state is State.ACTIVE}
    assert active == staying
