"""The shared rate limit on Miro's token endpoint, across real processes and threads."""

from __future__ import annotations

import bisect
import multiprocessing
import threading
import time
from typing import Any

import pytest
import redis

from worker.constants import RATE_LIMIT_KEY
from worker.miro import RateLimited
from worker.ratelimit import TokenRateLimit

RATE = 25.0
BURST = 5
PROCESSES = 2
THREADS = 4
PER_THREAD = 7
TOTAL = PROCESSES * THREADS * PER_THREAD  # 56: (56 - 5) / 25 = 2.04 s at least


def _acquire_in_threads(url: str, barrier: Any, out: Any) -> None:
    """One worker process: THREADS threads sharing one client, each recording its grants."""
    client = redis.Redis.from_url(url)
    limit = TokenRateLimit(client, RATE, burst=BURST, max_wait=5.0)
    granted: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(PER_THREAD):
            limit.acquire()
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
    limit = TokenRateLimit(redis_client, rate=1, burst=1, max_wait=0.5)
    limit.acquire()  # the burst: at once
    reserved = redis_client.get(RATE_LIMIT_KEY)
    assert reserved is not None

    for _ in range(3):
        before = time.time()
        with pytest.raises(RateLimited) as raised:
            limit.acquire()
        assert before + 0.5 <= raised.value.retry_at <= time.time() + 1.0

    assert redis_client.get(RATE_LIMIT_KEY) == reserved


def test_a_wait_within_max_wait_sleeps_until_the_slot(redis_client: redis.Redis) -> None:
    limit = TokenRateLimit(redis_client, rate=4, burst=1, max_wait=1.0)
    limit.acquire()
    started = time.monotonic()
    limit.acquire()
    assert time.monotonic() - started >= 0.2  # one slot is 0.25 s away
