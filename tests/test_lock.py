"""Single flight: one holder per credential, waiters get it after release, owners only."""

from __future__ import annotations

import logging
import threading

import pytest
import redis

from tests.conftest import wait_for
from worker.constants import lock_key
from worker.lock import single_flight

CREDENTIAL = "1:100"


def test_the_lock_key_carries_the_ttl(redis_client: redis.Redis) -> None:
    with single_flight(redis_client, CREDENTIAL, ttl=30, wait=0) as acquired:
        assert acquired
        assert 29_000 < redis_client.pttl(lock_key(CREDENTIAL)) <= 30_000
    assert not redis_client.exists(lock_key(CREDENTIAL))


def test_a_second_acquirer_without_wait_gets_false_at_once(redis_client: redis.Redis) -> None:
    with single_flight(redis_client, CREDENTIAL, ttl=30, wait=0) as first:
        holder = redis_client.get(lock_key(CREDENTIAL))
        with single_flight(redis_client, CREDENTIAL, ttl=30, wait=0) as second:
            assert first and not second
        assert redis_client.get(lock_key(CREDENTIAL)) == holder  # the loser released nothing


def test_another_credential_is_not_blocked(redis_client: redis.Redis) -> None:
    with (
        single_flight(redis_client, CREDENTIAL, ttl=30, wait=0) as first,
        single_flight(redis_client, "1:101", ttl=30, wait=0) as other,
    ):
        assert first and other


def test_a_waiting_acquirer_gets_the_lock_after_release(redis_client: redis.Redis) -> None:
    release = threading.Event()
    holding = threading.Event()
    results: list[bool] = []

    def hold() -> None:
        with single_flight(redis_client, CREDENTIAL, ttl=30, wait=0) as acquired:
            results.append(acquired)
            holding.set()
            release.wait(10)

    def wait_then_take() -> None:
        with single_flight(redis_client, CREDENTIAL, ttl=30, wait=10) as acquired:
            results.append(acquired)

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
        single_flight(redis_client, CREDENTIAL, ttl=30, wait=0),
        single_flight(redis_client, CREDENTIAL, ttl=30, wait=0.1) as second,
    ):
        assert not second


def test_only_the_owner_releases_a_lock_taken_over_after_its_ttl(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.lock")
    key = lock_key(CREDENTIAL)
    with single_flight(redis_client, CREDENTIAL, ttl=0.2, wait=0) as first:
        assert first
        wait_for(lambda: not redis_client.exists(key), timeout=5, message="the TTL to expire")
        other = redis_client.lock(key, timeout=30, thread_local=False)
        assert other.acquire(blocking=False)  # another worker takes the lock over
        taken_over = redis_client.get(key)

    assert redis_client.get(key) == taken_over  # the first owner's exit left it alone
    assert other.owned()
    assert "had expired before its release" in caplog.text
    other.release()
