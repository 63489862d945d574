"""The shared rate limit on Miro's token endpoint, across real processes and threads.

A slot is reserved as a rotation reserves it: with the credential's lock, in one step.
"""

from __future__ import annotations

import bisect
import json
import multiprocessing
import os
import threading
import time
from typing import Any

import pytest
import redis

from tests.conftest import run_cli
from worker import scripts
from worker.constants import RATE_LIMIT_KEY, lock_key
from worker.credential import CredentialId
from worker.lock import LockRequest, single_flight
from worker.miro import RateLimited
from worker.outcomes import Outcome
from worker.ratelimit import TokenRateLimit, waited_in_this_thread
from worker.sandbox import Sandbox, SandboxConfig
from worker.vault import Vault

RATE = 25.0
BURST = 5
PROCESSES = 2
THREADS = 4
PER_THREAD = 7
TOTAL = PROCESSES * THREADS * PER_THREAD  # 56: (56 - 5) / 25 = 2.04 s at least


def _reserve(client: redis.Redis, limit: TokenRateLimit, credential_id: str = "1:1") -> None:
    """What a rotation does before it calls Miro: take the lock with a slot, wait for the slot."""
    with single_flight(client, LockRequest(credential_id, 30, limit), wait=0) as flight:
        assert flight.acquired
        flight.wait_for_slot()


def _acquire_in_threads(url: str, barrier: Any, out: Any) -> None:
    """One worker process: THREADS threads sharing one client, each recording its grants."""
    client = redis.Redis.from_url(url)
    limit = TokenRateLimit(RATE, burst=BURST, max_wait=5.0)
    granted: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        for call in range(PER_THREAD):
            _reserve(client, limit, f"1:{os.getpid()}-{threading.get_ident()}-{call}")
            now = time.time()
            with lock:
                granted.append(now)

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    barrier.wait()
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put((started, granted))
    client.close()


@pytest.fixture(scope="module")
def run(redis_server: Any) -> tuple[float, list[float]]:
    """When the first process started asking, and the sorted times of all TOTAL grants."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.delete(RATE_LIMIT_KEY)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    out = context.Queue()
    processes = [
        context.Process(target=_acquire_in_threads, args=(redis_server.url, barrier, out))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    reports = [out.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert [process.exitcode for process in processes] == [0] * PROCESSES
    granted = sorted(stamp for _, stamps in reports for stamp in stamps)
    assert len(granted) == TOTAL
    return min(started for started, _ in reports), granted


@pytest.fixture
def grants(run: tuple[float, list[float]]) -> list[float]:
    return run[1]


def test_acquisitions_across_processes_take_at_least_what_the_rate_allows(
    run: tuple[float, list[float]],
) -> None:
    started, grants = run
    span = grants[-1] - started
    assert span >= (TOTAL - BURST) / RATE - 0.005
    assert span < (TOTAL - BURST) / RATE + 3  # it waits, but not for nothing


def test_the_burst_goes_at_once_and_the_next_call_waits_one_interval(
    run: tuple[float, list[float]],
) -> None:
    started, grants = run
    assert grants[BURST - 1] - started < 0.5
    assert grants[BURST] - started >= 1 / RATE - 0.005


def test_after_the_burst_no_second_holds_more_than_the_rate(grants: list[float]) -> None:
    busiest = max(
        bisect.bisect_left(grants, start + 1.0) - index
        for index, start in enumerate(grants)
        if index >= BURST
    )
    assert busiest <= RATE * 1.2 + 1, f"{busiest} calls within one second"
    assert busiest >= RATE * 0.5  # the limit was actually saturated


def test_a_wait_beyond_max_wait_raises_and_reserves_nothing(redis_client: redis.Redis) -> None:
    limit = TokenRateLimit(rate=1, burst=1, max_wait=0.5)
    _reserve(redis_client, limit)  # the burst: at once
    reserved = redis_client.get(RATE_LIMIT_KEY)
    assert reserved is not None

    for _ in range(3):
        before = time.time()
        with pytest.raises(RateLimited) as raised:
            _reserve(redis_client, limit)
        assert before + 0.5 <= raised.value.retry_at <= time.time() + 1.0

    assert redis_client.get(RATE_LIMIT_KEY) == reserved


def test_a_wait_within_max_wait_sleeps_until_the_slot(redis_client: redis.Redis) -> None:
    limit = TokenRateLimit(rate=4, burst=1, max_wait=1.0)
    _reserve(redis_client, limit)
    started = time.monotonic()
    _reserve(redis_client, limit)
    assert time.monotonic() - started >= 0.2  # one slot is 0.25 s away


def test_each_thread_counts_only_its_own_waits_for_slots(redis_client: redis.Redis) -> None:
    limit = TokenRateLimit(rate=4, burst=1, max_wait=1.0)
    before = waited_in_this_thread()
    _reserve(redis_client, limit, "1:1")
    _reserve(redis_client, limit, "1:2")  # one slot, 0.25 s, away
    elsewhere: list[float] = []
    thread = threading.Thread(target=lambda: elsewhere.append(waited_in_this_thread()))
    thread.start()
    thread.join()

    assert 0.2 <= waited_in_this_thread() - before <= 0.3
    assert elsewhere == [0.0]


def test_the_lock_outlives_its_ttl_by_the_wait_for_its_slot(redis_client: redis.Redis) -> None:
    limit = TokenRateLimit(rate=0.5, burst=1, max_wait=5.0)
    redis_client.delete(RATE_LIMIT_KEY)
    with single_flight(redis_client, LockRequest("1:1", 30, limit), wait=0) as first:
        assert first.slot == 0.0
        assert 29_000 < redis_client.pttl(first.key) <= 30_000
        first.wait_for_slot()  # spent: it called Miro
    with single_flight(redis_client, LockRequest("1:2", 30, limit), wait=0) as second:
        assert second.slot is not None and 1.0 < second.slot <= 2.0  # the next of 1 per 2 s
        # The TTL still covers the call to Miro and the commit once the slot comes due.
        assert 30_000 + second.slot * 1000 - 1000 < redis_client.pttl(second.key)
        assert redis_client.pttl(second.key) <= 30_000 + second.slot * 1000 + 1


def test_a_caller_that_does_not_get_the_lock_reserves_no_slot(redis_client: redis.Redis) -> None:
    limit = TokenRateLimit(rate=1, burst=1, max_wait=5.0)
    redis_client.delete(RATE_LIMIT_KEY)
    with single_flight(redis_client, LockRequest("1:1", 30, limit), wait=0) as holder:
        reserved = redis_client.get(RATE_LIMIT_KEY)
        with single_flight(redis_client, LockRequest("1:1", 30, limit), wait=0.05) as loser:
            assert not loser.acquired and loser.slot is None
        assert redis_client.get(RATE_LIMIT_KEY) == reserved
    assert holder.slot == 0.0  # the burst had room: no wait


def test_a_lock_taken_without_a_rate_limit_reserves_nothing(redis_client: redis.Redis) -> None:
    redis_client.delete(RATE_LIMIT_KEY)
    with single_flight(redis_client, LockRequest("1:1", 30), wait=0) as flight:
        assert flight.acquired and flight.slot is None
    assert not redis_client.exists(RATE_LIMIT_KEY)


def test_a_slot_not_spent_is_given_back_with_the_lock(redis_client: redis.Redis) -> None:
    limit = TokenRateLimit(rate=1, burst=1, max_wait=5.0)
    redis_client.delete(RATE_LIMIT_KEY)
    with single_flight(redis_client, LockRequest("1:1", 30, limit), wait=0) as spent:
        spent.wait_for_slot()  # then it calls Miro
    after_the_call = float(redis_client.get(RATE_LIMIT_KEY) or 0)

    with single_flight(redis_client, LockRequest("1:2", 30, limit), wait=0) as unspent:
        assert unspent.slot is not None and unspent.slot > 0.5  # the next slot, a second away
        assert float(redis_client.get(RATE_LIMIT_KEY) or 0) > after_the_call

    assert float(redis_client.get(RATE_LIMIT_KEY) or 0) == pytest.approx(after_the_call, abs=1e-3)


def test_waiting_for_a_slot_that_was_never_asked_for_is_a_clear_error(
    redis_client: redis.Redis,
) -> None:
    with (
        single_flight(redis_client, LockRequest("1:1", 30), wait=0) as flight,
        pytest.raises(RuntimeError, match="taken without a slot"),
    ):
        flight.wait_for_slot()


def test_a_bad_rate_is_refused_before_the_lock_is_taken(redis_client: redis.Redis) -> None:
    with (
        pytest.raises(redis.ResponseError, match="rate must be"),
        single_flight(redis_client, LockRequest("1:1", 30, TokenRateLimit(rate=0)), wait=0),
    ):
        pass
    assert not redis_client.exists(lock_key("1:1"))  # not left held until its TTL


def _take_and_release(client: redis.Redis) -> tuple[Any, Any]:
    return (
        client.register_script(scripts.source("take_lock")),
        client.register_script(scripts.source("release_lock")),
    )


def test_only_the_owner_gives_a_slot_back_and_a_retried_release_gives_nothing(
    redis_client: redis.Redis,
) -> None:
    limit = TokenRateLimit(rate=1, burst=1, max_wait=5.0)
    take, release = _take_and_release(redis_client)
    redis_client.delete(RATE_LIMIT_KEY)
    for request in (
        LockRequest("1:1", 30, limit, "first"),
        LockRequest("1:2", 30, limit, "second"),
    ):
        keys, args = request.script_call()  # the first spends the burst
        take(keys=keys, args=args)
    reserved = float(redis_client.get(RATE_LIMIT_KEY) or 0)
    give_back = [lock_key("1:2"), RATE_LIMIT_KEY]

    assert release(keys=give_back, args=["not-the-owner", limit.slot_length()]) == 0
    assert float(redis_client.get(RATE_LIMIT_KEY) or 0) == reserved
    assert release(keys=give_back, args=["second", limit.slot_length()]) == 1
    given_back = float(redis_client.get(RATE_LIMIT_KEY) or 0)
    assert given_back == pytest.approx(reserved - 1, abs=1e-3)
    assert release(keys=give_back, args=["second", limit.slot_length()]) == 0  # a retry
    assert float(redis_client.get(RATE_LIMIT_KEY) or 0) == pytest.approx(given_back, abs=1e-3)
    redis_client.delete(lock_key("1:1"), RATE_LIMIT_KEY)


def test_a_release_lets_go_of_the_lock_under_maxmemory(redis_client: redis.Redis) -> None:
    limit = TokenRateLimit(rate=1, burst=1, max_wait=5.0)
    redis_client.delete(RATE_LIMIT_KEY)
    with single_flight(redis_client, LockRequest("1:1", 30, limit), wait=0) as flight:
        redis_client.config_set("maxmemory", "1")  # every write that needs memory is refused
    try:
        assert flight.holds_unspent_slot  # so the release also tried to give it back
        assert not redis_client.exists(flight.key)
    finally:
        redis_client.config_set("maxmemory", "0")


def test_no_slot_falls_before_the_end_of_a_hold(redis_client: redis.Redis) -> None:
    """Miro's 429 said when its limit resets: a reset within the longest wait is waited for."""
    limit = TokenRateLimit(rate=1000, max_wait=5.0)
    redis_client.delete(RATE_LIMIT_KEY)
    limit.hold(redis_client, time.time() + 2)

    with single_flight(redis_client, LockRequest("1:1", 30, limit), wait=0) as flight:
        assert flight.slot is not None and 1.5 < flight.slot <= 2.0
        assert flight.held_until is None


def test_a_hold_beyond_the_longest_wait_refuses_the_slot_until_its_end(
    redis_client: redis.Redis,
) -> None:
    limit = TokenRateLimit(rate=1000, max_wait=5.0)
    redis_client.delete(RATE_LIMIT_KEY)
    until = time.time() + 30
    limit.hold(redis_client, until)

    with single_flight(redis_client, LockRequest("1:1", 30, limit), wait=0) as flight:
        with pytest.raises(RateLimited, match="Miro asked every worker to wait") as raised:
            flight.wait_for_slot()
        assert raised.value.retry_at == pytest.approx(until, abs=1e-3)
    assert not redis_client.exists(RATE_LIMIT_KEY)  # nothing reserved, nothing to give back


def test_a_hold_is_only_ever_extended_and_expires_after_its_end(redis_client: redis.Redis) -> None:
    limit = TokenRateLimit(rate=1000)
    now = time.time()
    limit.hold(redis_client, now + 30)
    limit.hold(redis_client, now + 10)  # another worker's 429, told of a sooner reset

    assert float(redis_client.get(limit.hold_key) or 0) == pytest.approx(now + 30, abs=1e-3)
    assert 30_000 < redis_client.pttl(limit.hold_key) <= 35_000
    limit.hold(redis_client, now + 40)
    assert float(redis_client.get(limit.hold_key) or 0) == pytest.approx(now + 40, abs=1e-3)


def test_a_lock_taken_without_a_slot_ignores_the_hold(redis_client: redis.Redis) -> None:
    TokenRateLimit(rate=1000).hold(redis_client, time.time() + 30)
    with single_flight(redis_client, LockRequest("1:1", 30), wait=0) as flight:
        assert flight.acquired and flight.held_until is None


def _told_429(sandbox: Sandbox, vault: Vault, reset_s: float) -> tuple[list[CredentialId], float]:
    """Three users; Miro answers the first one's refresh 429, its limit resetting in
    ``reset_s``. Returns the other two and the reset Miro announced."""
    told, *others = (
        vault.import_response({**grant, "expires_in": 120}).id for grant in sandbox.create_grants(3)
    )
    sandbox.set_faults(rate_limit_rate=1.0, rate_limit_reset_s=reset_s)
    result = vault.rotate_now(told)
    sandbox.set_faults(rate_limit_rate=0.0)
    assert result.outcome is Outcome.RATE_LIMITED and result.retry_at is not None
    return others, result.retry_at


def test_a_429_holds_every_process_back_until_the_reset_miro_announced(
    sandbox: Sandbox, vault: Vault, env: dict[str, str]
) -> None:
    (forced, used), reset = _told_429(sandbox, vault, reset_s=30)
    calls = sandbox.stats()["token_calls"]

    rotated = run_cli(env, "rotate", str(forced), "--now", "--json")
    token = run_cli(env, "token", str(used))  # due, but valid for two minutes yet
    scheduled = vault.rotator.rotate_due([forced, used])

    assert json.loads(rotated.stdout)["outcome"] == "rate_limited", rotated.stderr
    assert token.returncode == 0, token.stderr
    assert [result.outcome for result in scheduled] == [Outcome.RATE_LIMITED] * 2
    assert sandbox.stats()["token_calls"] == calls  # nobody called Miro
    for credential_id in (forced, used):
        assert vault.store.due_at(credential_id) == pytest.approx(reset, abs=1e-3)
        assert vault.store.load(credential_id).failure_count == 0


def test_a_reset_within_the_longest_wait_is_waited_for_by_another_process(
    sandbox: Sandbox, vault: Vault, env: dict[str, str]
) -> None:
    (forced, _), reset = _told_429(sandbox, vault, reset_s=4)

    rotated = run_cli(env, "rotate", str(forced), "--now", "--json")

    assert json.loads(rotated.stdout)["outcome"] == "rotated", rotated.stderr
    grant = sandbox.grant(forced.team_id, forced.user_id)
    assert grant is not None
    called_at = grant["access_expires_at"] - SandboxConfig.access_ttl  # when Miro issued it
    assert called_at >= reset - 0.01
    assert sandbox.stats()["token_calls"] == 2
