"""Incidents: refusals that mean "the app is broken" pause refreshing instead of killing users."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest
import redis

from tests.conftest import wait_for
from worker.constants import PAUSED_KEY
from worker.credential import Credential, State
from worker.incident import IncidentGuard, Signal
from worker.rotation import CONFIRM_DELAY, Outcome
from worker.sandbox import Sandbox
from worker.vault import Vault

WINDOW = 60
START = 1_800_000_000.0  # the start of a window: a multiple of WINDOW


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def guard(redis_client: redis.Redis, clock: Clock) -> IncidentGuard:
    return IncidentGuard(
        redis_client, window=WINDOW, min_events=10, refused_ratio=0.5, probe_interval=1, clock=clock
    )


def _record(guard: IncidentGuard, signal: Signal, times: int) -> None:
    for _ in range(times):
        guard.record(signal)


def test_pause_keeps_the_first_reason_until_resumed(guard: IncidentGuard) -> None:
    assert guard.paused() is None
    guard.pause("first")
    guard.pause("second")
    assert guard.paused() == "first"
    assert guard.resume() is True
    assert guard.paused() is None
    assert guard.resume() is False


def test_a_client_refusal_pauses_at_once(guard: IncidentGuard) -> None:
    guard.record(Signal.CLIENT_REFUSED)
    reason = guard.paused()
    assert reason is not None and "MIRO_CLIENT_ID" in reason


@pytest.mark.parametrize("signal", [Signal.REFUSED, Signal.TRANSIENT])
def test_a_single_refusal_or_transient_error_does_not_pause(
    guard: IncidentGuard, signal: Signal
) -> None:
    guard.record(signal)
    assert guard.paused() is None
    assert not guard.mass_refusal()


def test_mass_refusal_within_a_window_pauses(guard: IncidentGuard) -> None:
    _record(guard, Signal.OK, 4)
    _record(guard, Signal.REFUSED, 6)  # 6 of 10: a majority

    assert guard.mass_refusal() is True
    reason = guard.paused()
    assert reason is not None and "6 of 10" in reason


@pytest.mark.parametrize(
    ("refused", "others"),
    [(5, 5), (3, 7), (9, 0)],  # half is not a majority; 9 are fewer than min_events
)
def test_a_minority_or_too_few_refusals_do_not_pause(
    guard: IncidentGuard, refused: int, others: int
) -> None:
    _record(guard, Signal.REFUSED, refused)
    _record(guard, Signal.TRANSIENT, others)

    assert guard.mass_refusal() is False
    assert guard.paused() is None


def test_an_ok_signal_resumes(guard: IncidentGuard) -> None:
    guard.record(Signal.CLIENT_REFUSED)
    assert guard.paused() is not None
    guard.record(Signal.TRANSIENT)
    assert guard.paused() is not None
    guard.record(Signal.OK)
    assert guard.paused() is None


def test_refusals_in_an_earlier_window_are_forgotten(guard: IncidentGuard, clock: Clock) -> None:
    _record(guard, Signal.REFUSED, 10)
    clock.now = START + WINDOW  # the next window

    assert guard.mass_refusal() is False
    assert guard.paused() is None
    clock.now = START + WINDOW - 1  # back in the first window: its counts are still there
    assert guard.mass_refusal() is True


def test_refusals_split_across_a_window_boundary_do_not_add_up(
    guard: IncidentGuard, clock: Clock
) -> None:
    clock.now = START + WINDOW - 0.5
    _record(guard, Signal.REFUSED, 6)
    assert guard.mass_refusal() is False
    clock.now = START + WINDOW
    _record(guard, Signal.REFUSED, 6)
    assert guard.mass_refusal() is False
    _record(guard, Signal.REFUSED, 4)
    assert guard.mass_refusal() is True


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


# Through the vault, against the sandbox.


def _due_credential(sandbox: Sandbox, vault: Vault) -> Credential:
    """A stored credential whose access token is about to expire: the scan would pick it."""
    [response] = sandbox.create_grants(1)
    response["expires_in"] = 120
    credential = vault.import_response(response)
    assert vault.policy.is_due(credential, time.time())
    return credential


def test_a_scheduled_refusal_is_confirmed_once_before_needs_reauth(
    sandbox: Sandbox, vault: Vault
) -> None:
    credential = _due_credential(sandbox, vault)
    changes: list[Any] = []
    vault.listeners.append(changes.append)
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)

    before = time.time()
    first = vault.rotator.rotate(credential.id)

    assert first.outcome is Outcome.RESCHEDULED
    stored = vault.store.load(credential.id)
    assert stored.state is State.ACTIVE and stored.refusals == 1
    due = vault.store.due_at(credential.id)
    assert due is not None
    assert before + CONFIRM_DELAY - 1 <= due <= time.time() + CONFIRM_DELAY + 1
    assert changes == []

    second = vault.rotator.rotate(credential.id)

    assert second.outcome is Outcome.NEEDS_REAUTH
    assert vault.store.load(credential.id).state is State.NEEDS_REAUTH
    assert vault.store.due_at(credential.id) is None
    assert [change.new for change in changes] == [State.NEEDS_REAUTH]
    assert sandbox.stats()["token_calls"] == 2


def test_while_paused_a_refusal_never_marks_needs_reauth(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    credential = _due_credential(sandbox, vault)
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)
    vault.rotator.guard.pause("test incident")

    outcomes = [vault.rotate_now(credential.id).outcome for _ in range(3)]

    assert outcomes == [Outcome.PAUSED] * 3
    assert sandbox.stats()["token_calls"] == 3  # forced: the refusal was real, the verdict held
    stored = vault.store.load(credential.id)
    assert stored.state is State.ACTIVE
    assert redis_client.get(PAUSED_KEY) == b"test incident"


def test_while_paused_a_scheduled_rotation_does_not_call_miro(
    sandbox: Sandbox, vault: Vault
) -> None:
    credential = _due_credential(sandbox, vault)
    vault.rotator.guard.pause("test incident")
    calls = sandbox.stats()["token_calls"]

    result = vault.rotator.rotate(credential.id)

    assert result.outcome is Outcome.PAUSED
    assert result.detail == "test incident"
    assert sandbox.stats()["token_calls"] == calls
    assert vault.store.load(credential.id) == credential
    assert result.retry_at is not None
    assert vault.store.due_at(credential.id) == pytest.approx(result.retry_at)


def test_a_mass_refusal_through_the_vault_pauses_and_spares_the_rest(
    sandbox: Sandbox, vault: Vault
) -> None:
    # A fixed clock keeps all 22 refusals in one window.
    vault.rotator.guard = dataclasses.replace(vault.rotator.guard, clock=Clock())
    credentials = [vault.import_response(response) for response in sandbox.create_grants(22)]
    for credential in credentials:
        sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)

    outcomes = [vault.rotate_now(credential.id).outcome for credential in credentials]

    # Default guard: 20 events make a window count; from then on refusals are an incident.
    assert outcomes.count(Outcome.NEEDS_REAUTH) == 19
    assert outcomes[19:] == [Outcome.PAUSED] * 3
    assert vault.rotator.guard.paused() is not None
    for credential in credentials[19:]:
        assert vault.store.load(credential.id).state is State.ACTIVE


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
