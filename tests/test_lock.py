"""Single flight: one holder per credential, waiters get it after release, owners only; the
record is read as the lock is taken, and a commit lets go of it in its own step."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
import redis

from tests.conftest import wait_for
from worker import scripts
from worker.constants import DUE_INDEX, RATE_LIMIT_KEY, credential_key, lock_key
from worker.credential import Credential, CredentialId
from worker.crypto import TokenCipher
from worker.lock import AHEAD_MAX_AGE, LockRequest, let_go_ahead, single_flight
from worker.ratelimit import TokenRateLimit
from worker.record import encode
from worker.secret import Secret
from worker.store import ABSENT, CredentialStore

CREDENTIAL = "1:100"


def test_the_lock_key_carries_the_ttl(redis_client: redis.Redis) -> None:
    with single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0) as flight:
        assert flight.acquired
        assert 29_000 < redis_client.pttl(lock_key(CREDENTIAL)) <= 30_000
    assert not redis_client.exists(lock_key(CREDENTIAL))


def test_a_second_acquirer_without_wait_gets_false_at_once(redis_client: redis.Redis) -> None:
    with single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0) as first:
        holder = redis_client.get(lock_key(CREDENTIAL))
        with single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0) as second:
            assert first.acquired and not second.acquired
        assert redis_client.get(lock_key(CREDENTIAL)) == holder  # the loser released nothing


def test_another_credential_is_not_blocked(redis_client: redis.Redis) -> None:
    with (
        single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0) as first,
        single_flight(redis_client, LockRequest("1:101", 30), wait=0) as other,
    ):
        assert first.acquired and other.acquired


def test_a_waiting_acquirer_gets_the_lock_after_release(redis_client: redis.Redis) -> None:
    release = threading.Event()
    holding = threading.Event()
    results: list[bool] = []

    def hold() -> None:
        with single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0) as flight:
            results.append(flight.acquired)
            holding.set()
            release.wait(10)

    def wait_then_take() -> None:
        with single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=10) as flight:
            results.append(flight.acquired)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    waiter = threading.Thread(target=wait_then_take)
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive()  # blocked while the lock is held

    release.set()
    holder.join(5)
    waiter.join(5)
    assert results == [True, True]


def test_a_waiter_gives_up_after_its_wait(redis_client: redis.Redis) -> None:
    with (
        single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0),
        single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0.1) as second,
    ):
        assert not second.acquired


def test_only_the_owner_releases_a_lock_taken_over_after_its_ttl(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.lock")
    key = lock_key(CREDENTIAL)
    with single_flight(redis_client, LockRequest(CREDENTIAL, 0.2), wait=0) as first:
        assert first.acquired
        wait_for(lambda: not redis_client.exists(key), timeout=5, message="the TTL to expire")
        other = redis_client.lock(key, timeout=30, thread_local=False)
        assert other.acquire(blocking=False)  # another worker takes the lock over
        taken_over = redis_client.get(key)

    assert redis_client.get(key) == taken_over  # the first owner's exit left it alone
    assert other.owned()
    assert "had expired before its release" in caplog.text
    other.release()


def test_the_record_is_read_in_the_step_that_takes_the_lock(redis_client: redis.Redis) -> None:
    redis_client.set(credential_key(CREDENTIAL), b"the record")
    with single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0) as first:
        with single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0) as second:
            assert second.record is None  # a loser reads nothing
        assert first.record == b"the record"
    with single_flight(redis_client, LockRequest("1:absent", 30), wait=0) as absent:
        assert absent.acquired and absent.record is None


def test_a_commit_lets_go_of_its_lock_in_its_own_step(
    redis_client: redis.Redis, encryption_key: str
) -> None:
    store = CredentialStore(redis_client, TokenCipher.from_text(encryption_key))
    credential = _credential()
    with single_flight(redis_client, LockRequest(str(credential.id), 30), wait=0) as flight:
        data = encode(credential, store.cipher)
        assert store.write(credential.id, ABSENT, data, due=None, release=flight)
        assert flight.released and not redis_client.exists(flight.key)
        taken = redis_client.lock(flight.key, timeout=30, thread_local=False)
        assert taken.acquire(blocking=False)
    assert taken.owned()  # the context's exit did not let go a second time
    taken.release()


def test_a_commit_leaves_a_lock_taken_over_after_its_ttl(
    redis_client: redis.Redis, encryption_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.store")
    store = CredentialStore(redis_client, TokenCipher.from_text(encryption_key))
    credential = _credential()
    with single_flight(redis_client, LockRequest(str(credential.id), 0.2), wait=0) as flight:
        wait_for(lambda: not redis_client.exists(flight.key), timeout=5, message="the TTL")
        other = redis_client.lock(flight.key, timeout=30, thread_local=False)
        assert other.acquire(blocking=False)
        data = encode(credential, store.cipher)
        assert store.write(credential.id, ABSENT, data, due=None, release=flight)
    assert other.owned()  # the compare-and-swap still guards the record; the lock is theirs
    assert "had expired before its commit" in caplog.text
    other.release()


def _credential() -> Credential:
    return Credential(
        id=CredentialId.parse(CREDENTIAL),
        access_token=Secret("access"),
        refresh_token=Secret("refresh"),
        access_expires_at=None,
        refresh_expires_at=None,
        scope="boards:read",
    )


def test_a_take_repeated_after_its_reply_was_lost_finds_the_lock_its_own(
    redis_client: redis.Redis,
) -> None:
    take = redis_client.register_script(scripts.source("take_lock"))
    keys = [lock_key(CREDENTIAL), credential_key(CREDENTIAL)]
    assert take(keys=keys, args=["owner-a", 30_000])[0] == 1
    redis_client.pexpire(lock_key(CREDENTIAL), 1_000)  # as if its reply were long lost
    assert take(keys=keys, args=["owner-a", 30_000])[0] == 1  # the same caller, retrying
    assert redis_client.pttl(lock_key(CREDENTIAL)) > 29_000  # counted from the retry
    assert take(keys=keys, args=["owner-b", 30_000]) == [0]
    redis_client.delete(lock_key(CREDENTIAL))


def _hand_over(redis_client: redis.Redis, following: LockRequest) -> None:
    """Take and let go of a lock, taking ``following``'s in the round trip that lets go."""
    with single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0, then=following):
        pass


def test_letting_go_takes_the_next_lock_in_the_same_round_trip(redis_client: redis.Redis) -> None:
    redis_client.set(credential_key("1:101"), b"the next record")
    following = LockRequest("1:101", 30)
    with single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0, then=following):
        assert following.taken_ahead is None
    ahead = following.taken_ahead
    assert ahead is not None and ahead.acquired and ahead.record == b"the next record"
    assert not redis_client.exists(lock_key(CREDENTIAL))
    assert redis_client.get(lock_key("1:101")) == following.owner.encode()
    with single_flight(redis_client, following, wait=0) as flight:
        assert flight is ahead  # used as it is: no second take
    assert not redis_client.exists(lock_key("1:101"))


def _commit_handing_over(
    redis_client: redis.Redis, encryption_key: str, before: Callable[[], object] = lambda: None
) -> tuple[LockRequest, bytes]:
    """Commit a new credential from a flight whose next take is ``1:101``'s; ``before`` runs
    just before the commit. Returns that take and the record committed."""
    store = CredentialStore(redis_client, TokenCipher.from_text(encryption_key))
    credential = _credential()
    following = LockRequest("1:101", 30)
    request = LockRequest(str(credential.id), 30)
    with single_flight(redis_client, request, wait=0, then=following) as flight:
        before()
        data = encode(credential, store.cipher)
        assert store.write(credential.id, ABSENT, data, due=None, release=flight)
        assert not redis_client.exists(flight.key)
    return following, data


def test_a_commit_takes_the_next_lock_in_its_own_round_trip(
    redis_client: redis.Redis, encryption_key: str
) -> None:
    following, _ = _commit_handing_over(redis_client, encryption_key)
    assert following.taken_ahead is not None and following.taken_ahead.acquired
    assert redis_client.get(lock_key("1:101")) == following.owner.encode()
    let_go_ahead(redis_client, following)


def test_a_lock_taken_ahead_can_be_let_go_of_with_its_slot(redis_client: redis.Redis) -> None:
    limit = TokenRateLimit(rate=10, burst=1)
    following = LockRequest("1:101", 30, limit)
    _hand_over(redis_client, following)
    ahead = following.taken_ahead
    assert ahead is not None and ahead.acquired and ahead.slot == 0
    reserved_until = float(redis_client.get(RATE_LIMIT_KEY) or 0)

    let_go_ahead(redis_client, following)

    assert following.taken_ahead is None
    assert not redis_client.exists(lock_key("1:101"))
    assert float(redis_client.get(RATE_LIMIT_KEY) or 0) < reserved_until  # the slot is back


def test_a_lock_taken_ahead_outlives_its_ttl_by_the_longest_it_may_wait(
    redis_client: redis.Redis,
) -> None:
    following = LockRequest("1:101", 30)
    _hand_over(redis_client, following)
    assert 30_000 < redis_client.pttl(lock_key("1:101")) <= (30 + AHEAD_MAX_AGE) * 1000
    let_go_ahead(redis_client, following)


def test_a_lock_taken_ahead_too_long_ago_is_taken_anew_reading_the_record_again(
    redis_client: redis.Redis,
) -> None:
    following = LockRequest("1:101", 30)
    _hand_over(redis_client, following)
    ahead = following.taken_ahead
    assert ahead is not None and ahead.record is None
    ahead.taken_at -= AHEAD_MAX_AGE  # its rotation came late (a slow webhook before it)
    redis_client.set(credential_key("1:101"), b"written meanwhile")

    with single_flight(redis_client, following, wait=0) as flight:
        assert flight is not ahead and flight.acquired
        assert flight.record == b"written meanwhile"
        assert 29_000 < redis_client.pttl(lock_key("1:101")) <= 30_000
    assert not redis_client.exists(lock_key("1:101"))


def test_a_next_lock_held_by_another_is_tried_again_by_its_own_flight(
    redis_client: redis.Redis,
) -> None:
    other = redis_client.lock(lock_key("1:101"), timeout=30, thread_local=False)
    assert other.acquire(blocking=False)
    following = LockRequest("1:101", 30)
    _hand_over(redis_client, following)
    assert following.taken_ahead is not None and not following.taken_ahead.acquired
    other.release()
    with single_flight(redis_client, following, wait=0) as flight:
        assert flight.acquired


def test_a_redis_that_forgot_its_scripts_still_commits_and_the_next_take_is_sent_again(
    redis_client: redis.Redis, encryption_key: str
) -> None:
    # What a restarted Redis without persistence knows.
    following, data = _commit_handing_over(redis_client, encryption_key, redis_client.script_flush)
    assert redis_client.get(credential_key(CREDENTIAL)) == data
    assert following.taken_ahead is None
    with single_flight(redis_client, following, wait=0) as again:
        assert again.acquired


def test_a_handed_over_commit_that_fails_quotes_none_of_its_record(
    redis_client: redis.Redis, encryption_key: str
) -> None:
    store = CredentialStore(redis_client, TokenCipher.from_text(encryption_key))
    credential = _credential()
    following = LockRequest("1:101", 30)
    data = encode(credential, store.cipher)
    with (
        pytest.raises(redis.ResponseError) as raised,
        single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0, then=following) as flight,
    ):
        redis_client.rpush(credential_key(CREDENTIAL), "not a record")  # the commit: WRONGTYPE
        store.write(credential.id, ABSENT, data, due=None, release=flight)
    message = str(raised.value)
    assert message.startswith("WRONGTYPE")
    assert data.split(b"\n")[0].decode() not in message  # nor any other argument: no EVALSHA
    assert "EVALSHA" not in message.upper()
    assert following.taken_ahead is not None  # the take rode along with the failed commit
    let_go_ahead(redis_client, following)
    redis_client.delete(credential_key(CREDENTIAL))


def _rotation_lock(ttl: float) -> LockRequest:
    return LockRequest(CREDENTIAL, ttl, TokenRateLimit(rate=1000))


def test_a_rotation_s_lock_hides_its_credential_from_the_scan_while_it_lives(
    redis_client: redis.Redis,
) -> None:
    """Claimed for a shorter lease than the lock lives: a scan must not hand out a credential
    whose rotation runs, and a rotation that died comes back as its lock runs out."""
    now = time.time()
    redis_client.zadd(DUE_INDEX, {CREDENTIAL: now + 2})

    with single_flight(redis_client, _rotation_lock(30), wait=0) as flight:
        flight.keep()  # as a rotation killed before its commit

    assert redis_client.zscore(DUE_INDEX, CREDENTIAL) == pytest.approx(now + 30, abs=1)


def test_a_rotation_s_lock_never_pulls_a_due_time_in_nor_schedules_a_credential(
    redis_client: redis.Redis,
) -> None:
    later = time.time() + 3600
    redis_client.zadd(DUE_INDEX, {CREDENTIAL: later})
    with single_flight(redis_client, _rotation_lock(30), wait=0):
        pass
    with single_flight(redis_client, LockRequest("1:unscheduled", 30, TokenRateLimit(1)), wait=0):
        pass

    assert redis_client.zscore(DUE_INDEX, CREDENTIAL) == later
    assert redis_client.zscore(DUE_INDEX, "1:unscheduled") is None


def test_a_lock_taken_for_anything_but_a_rotation_leaves_the_schedule_alone(
    redis_client: redis.Redis,
) -> None:
    """A revoke deletes the credential or keeps it as it was."""
    soon = time.time() + 2
    redis_client.zadd(DUE_INDEX, {CREDENTIAL: soon})
    with single_flight(redis_client, LockRequest(CREDENTIAL, 30), wait=0):
        pass
    assert redis_client.zscore(DUE_INDEX, CREDENTIAL) == soon
