"""The schedule: when a credential is due, when a failed one is retried. Pure functions."""

from __future__ import annotations

import random

import pytest

from settings import Settings
from worker.credential import Credential, CredentialId, State
from worker.schedule import (
    ACCESS_LAST_CHANCE_FRACTION,
    BACKOFF_BASE,
    BACKOFF_CAP,
    JITTER_FRACTION,
    LAST_CHANCE,
    MIN_ACCESS_VALIDITY,
    Policy,
    retry_at,
)
from worker.secret import Secret

NOW = 1_700_000_000
ACCESS_MARGIN = 900.0
REFRESH_MARGIN = 7 * 86400.0
EAGER = Policy(ACCESS_MARGIN, REFRESH_MARGIN, eager=True)
KEEPALIVE = Policy(ACCESS_MARGIN, REFRESH_MARGIN, eager=False)


def _credential(
    access_in: float | None = 3599, refresh_in: float | None = 60 * 86400, **changes: object
) -> Credential:
    fields: dict[str, object] = {
        "id": CredentialId("1", "2"),
        "access_token": Secret("a"),
        "refresh_token": Secret("r"),
        "access_expires_at": None if access_in is None else int(NOW + access_in),
        "refresh_expires_at": None if refresh_in is None else int(NOW + refresh_in),
    }
    fields.update(changes)
    return Credential(**fields)  # type: ignore[arg-type]


def test_policy_comes_from_the_settings() -> None:
    policy = Policy.from_settings(
        Settings.from_env({"ACCESS_REFRESH_MARGIN": "600", "REFRESH_POLICY": "keepalive"})
    )
    assert policy == Policy(600, 7 * 86400, eager=False)


def test_eager_is_due_a_margin_before_the_access_token_expires() -> None:
    credential = _credential()
    due = EAGER.due_at(credential, random.Random(1))
    assert due is not None
    expiry = NOW + 3599
    assert expiry - ACCESS_MARGIN * (1 + JITTER_FRACTION) <= due <= expiry - ACCESS_MARGIN


def test_keepalive_is_due_a_margin_before_the_refresh_token_expires() -> None:
    credential = _credential()
    due = KEEPALIVE.due_at(credential, random.Random(1))
    assert due is not None
    expiry = NOW + 60 * 86400
    assert expiry - REFRESH_MARGIN * (1 + JITTER_FRACTION) <= due <= expiry - REFRESH_MARGIN


def test_eager_takes_the_refresh_expiry_when_it_comes_first() -> None:
    credential = _credential(access_in=30 * 86400, refresh_in=8 * 86400)
    due = EAGER.due_at(credential, random.Random(1))
    assert due is not None
    assert due <= NOW + 86400  # 8 days minus the 7-day margin


def test_jitter_stays_within_ten_percent_of_the_margin_and_spreads() -> None:
    rng = random.Random(42)
    credential = _credential()
    latest = NOW + 3599 - ACCESS_MARGIN
    offsets = [latest - EAGER.due_at(credential, rng) for _ in range(500)]  # type: ignore[operator]
    assert min(offsets) >= 0
    assert max(offsets) <= ACCESS_MARGIN * JITTER_FRACTION
    assert len({round(offset) for offset in offsets}) > 50  # really spread out


def test_the_same_seed_gives_the_same_due_time() -> None:
    credential = _credential()
    assert EAGER.due_at(credential, random.Random(7)) == EAGER.due_at(credential, random.Random(7))


@pytest.mark.parametrize("state", [State.NEEDS_REAUTH, State.REVOKED, State.UNDECRYPTABLE])
def test_a_credential_that_is_not_active_is_never_due(state: State) -> None:
    assert EAGER.due_at(_credential(state=state)) is None


@pytest.mark.parametrize(
    "credential",
    [
        _credential(refresh_token=None),
        _credential(access_in=None),
        _credential(refresh_token=None, access_in=None, refresh_in=None),
    ],
)
def test_a_non_expiring_credential_is_never_due(credential: Credential) -> None:
    assert EAGER.due_at(credential) is None
    assert KEEPALIVE.due_at(credential) is None
    assert not EAGER.is_due(credential, NOW + 10**9)
    assert not EAGER.must_refresh_before_use(credential, NOW + 10**9)


def test_is_due_from_the_jittered_access_margin_under_eager_only() -> None:
    credential = _credential(access_in=3599)
    earliest = NOW + 3599 - ACCESS_MARGIN * (1 + JITTER_FRACTION)
    assert not EAGER.is_due(credential, earliest - 1)
    assert EAGER.is_due(credential, NOW + 3599 - ACCESS_MARGIN)
    assert not KEEPALIVE.is_due(credential, NOW + 3599 - ACCESS_MARGIN)


def test_is_due_from_the_jittered_refresh_margin_under_both_policies() -> None:
    credential = _credential(access_in=100 * 86400, refresh_in=60 * 86400)
    earliest = NOW + 60 * 86400 - REFRESH_MARGIN * (1 + JITTER_FRACTION)
    for policy in (EAGER, KEEPALIVE):
        assert not policy.is_due(credential, earliest - 1)
        assert policy.is_due(credential, NOW + 60 * 86400 - REFRESH_MARGIN)


@pytest.mark.parametrize("policy", [EAGER, KEEPALIVE])
def test_every_due_time_is_due_so_a_claimed_credential_is_never_turned_away(
    policy: Policy,
) -> None:
    credential = _credential()
    rng = random.Random(11)
    for _ in range(200):
        due = policy.due_at(credential, rng)
        assert due is not None and policy.is_due(credential, due)


def test_keepalive_refreshes_before_use_only_when_the_access_token_is_about_to_expire() -> None:
    credential = _credential(access_in=600)
    assert not KEEPALIVE.must_refresh_before_use(credential, NOW)
    assert EAGER.must_refresh_before_use(credential, NOW)  # inside the 900 s margin
    about_to_expire = NOW + 600 - MIN_ACCESS_VALIDITY
    assert KEEPALIVE.must_refresh_before_use(credential, about_to_expire)
    assert KEEPALIVE.access_expiring(credential, about_to_expire)
    assert not KEEPALIVE.access_expiring(credential, about_to_expire - 1)


@pytest.mark.parametrize("failures", [0, 1, 2, 3, 4, 6])
def test_retry_backoff_doubles_with_each_failure_with_full_jitter(failures: int) -> None:
    credential = _credential()
    delay = BACKOFF_BASE * 2 ** max(failures - 1, 0)
    rng = random.Random(failures)
    waits = [retry_at(credential, failures, NOW, rng) - NOW for _ in range(200)]
    assert all(delay / 2 <= wait <= delay for wait in waits)
    assert max(waits) - min(waits) > delay / 4


def test_retry_backoff_grows() -> None:
    credential = _credential()
    rng = random.Random(3)
    waits = [retry_at(credential, failures, NOW, rng) - NOW for failures in range(1, 8)]
    assert all(later > earlier for earlier, later in zip(waits[::2], waits[2::2], strict=False))
    assert waits[-1] > 10 * waits[0]


def test_retry_backoff_is_capped() -> None:
    credential = _credential()
    rng = random.Random(5)
    waits = [retry_at(credential, failures, NOW, rng) - NOW for failures in range(9, 60)]
    assert all(BACKOFF_CAP / 2 <= wait <= BACKOFF_CAP for wait in waits)


def test_retry_backoff_is_capped_after_thousands_of_failures() -> None:
    wait = retry_at(_credential(), 1100, NOW, random.Random(1)) - NOW
    assert BACKOFF_CAP / 2 <= wait <= BACKOFF_CAP


def test_a_retry_never_lands_past_the_refresh_tokens_last_chance() -> None:
    credential = _credential(refresh_in=200)
    for failures in range(1, 12):
        when = retry_at(credential, failures, NOW, random.Random(failures))
        assert when <= NOW + 200 - LAST_CHANCE


def test_a_long_backoff_is_cut_short_once_to_try_before_the_access_token_expires() -> None:
    credential = _credential(access_in=150)
    for failures in range(7, 12):  # backoffs of 150 s and more
        when = retry_at(credential, failures, NOW, random.Random(failures), access_last_chance=50)
        assert NOW + 100 <= when <= NOW + 100 + 50 * JITTER_FRACTION


def test_credentials_sharing_an_expiry_get_their_last_chance_at_different_moments() -> None:
    credential = _credential(access_in=300)  # last chance 100 s away; backoffs of 150 s+
    chances = {
        retry_at(credential, 9, NOW, random.Random(seed), access_last_chance=200)
        for seed in range(20)
    }
    assert len(chances) == 20
    assert all(NOW + 100 <= when <= NOW + 100 + 200 * JITTER_FRACTION for when in chances)


def test_a_last_chance_a_moment_away_is_still_a_second_off() -> None:
    credential = _credential(access_in=2)
    now = NOW + 0.8  # the last chance, 1 s before expiry, is 0.2 s away
    when = retry_at(credential, 9, now, random.Random(1), access_last_chance=1)
    assert when == now + 1


def test_a_backoff_that_lands_before_the_access_tokens_last_chance_is_left_alone() -> None:
    credential = _credential(access_in=200)
    delay = BACKOFF_BASE * 2
    when = retry_at(credential, 2, NOW, random.Random(2), access_last_chance=50)
    assert NOW + delay / 2 <= when <= NOW + delay


def test_past_the_access_tokens_last_chance_the_backoff_resumes() -> None:
    credential = _credential(access_in=30)  # the last chance, 50 s before expiry, has passed
    waits = [
        retry_at(credential, 7, NOW, random.Random(seed), access_last_chance=50) - NOW
        for seed in range(50)
    ]
    assert all(BACKOFF_CAP / 2 <= wait <= BACKOFF_CAP for wait in waits)


def test_only_the_eager_policy_has_a_last_chance_for_access_tokens() -> None:
    assert EAGER.access_last_chance == ACCESS_MARGIN * ACCESS_LAST_CHANCE_FRACTION
    assert KEEPALIVE.access_last_chance is None


def test_a_retry_after_the_last_chance_is_one_second_away() -> None:
    credential = _credential(refresh_in=30)  # the last minute has begun
    assert retry_at(credential, 8, NOW, random.Random(1)) == NOW + 1
