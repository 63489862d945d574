"""The scan over a real Redis: claims are leased, disjoint under concurrency, and cheap."""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis

from tests.conftest import wait_for
from worker.constants import DUE_INDEX
from worker.incident import IncidentGuard
from worker.scan import Scanner, chunked

NOW = 1_800_000_000.0
LEASE = 120.0
CONCURRENT_DUE = 2_000


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Calls:
    """Records what ``tick`` hands to one of its enqueue callbacks."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, ids: Sequence[str]) -> None:
        self.batches.append(list(ids))

    @property
    def ids(self) -> list[str]:
        return [item for batch in self.batches for item in batch]


def _scanner(
    client: redis.Redis,
    clock: Callable[[], float],
    batch: int = 100,
    probe_interval: int = 30,
    start_rate: float = 1000.0,
) -> Scanner:
    guard = IncidentGuard(client, probe_interval=probe_interval, clock=clock)
    return Scanner(client, guard, batch=batch, lease=LEASE, start_rate=start_rate, clock=clock)


def _add_due(client: redis.Redis, scores: dict[str, float]) -> None:
    client.zadd(DUE_INDEX, scores)


def _due_set(count: int, before: float, prefix: str = "1") -> dict[str, float]:
    """``count`` ids due before ``before``, one second apart, the earliest first."""
    return {f"{prefix}:{index}": before - count + index for index in range(count)}


def test_claim_returns_only_due_ids_earliest_first_up_to_the_limit(
    redis_client: redis.Redis,
) -> None:
    due = _due_set(10, NOW + 1)  # the last one is due exactly now
    _add_due(redis_client, {**due, "2:later": NOW + 0.5, "2:much-later": NOW + 3600})
    scanner = _scanner(redis_client, Clock())

    first = scanner.claim(4)
    rest = scanner.claim(100)

    assert first == list(due)[:4]
    assert rest == list(due)[4:]
    assert scanner.claim(0) == []


def test_each_claimed_id_is_pushed_to_now_plus_lease(redis_client: redis.Redis) -> None:
    due = _due_set(5, NOW)
    _add_due(redis_client, {**due, "2:later": NOW + 60})
    scanner = _scanner(redis_client, Clock())

    claimed = scanner.claim(3)

    for credential_id in claimed:
        assert redis_client.zscore(DUE_INDEX, credential_id) == NOW + LEASE
    for credential_id in list(due)[3:]:
        assert redis_client.zscore(DUE_INDEX, credential_id) == due[credential_id]
    assert redis_client.zscore(DUE_INDEX, "2:later") == NOW + 60


def test_a_second_claim_right_after_returns_none_of_the_claimed(
    redis_client: redis.Redis,
) -> None:
    _add_due(redis_client, _due_set(20, NOW))
    scanner = _scanner(redis_client, Clock())

    first = scanner.claim(20)

    assert len(first) == 20
    assert scanner.claim(20) == []


def test_claims_come_due_again_when_their_lease_runs_out(redis_client: redis.Redis) -> None:
    due = _due_set(5, NOW)
    _add_due(redis_client, due)
    clock = Clock()
    scanner = _scanner(redis_client, clock)
    claimed = scanner.claim(10)

    clock.now = NOW + LEASE - 1
    assert scanner.claim(10) == []
    clock.now = NOW + LEASE
    assert sorted(scanner.claim(10)) == sorted(claimed) == sorted(due)


def _claim_until_empty(scanner: Scanner, limit: int) -> list[str]:
    claimed: list[str] = []
    while batch := scanner.claim(limit):
        claimed += batch
    return claimed


def _assert_disjoint_and_complete(results: list[list[str]], due: dict[str, float]) -> None:
    every = [item for result in results for item in result]
    assert len(every) == len(set(every)), "a credential was claimed twice"
    assert set(every) == set(due)
    assert sum(1 for result in results if result) >= 2, "the claimers did not overlap"


def test_eight_threads_claim_disjoint_sets_covering_exactly_the_due_ones(
    redis_client: redis.Redis,
) -> None:
    now = time.time()
    due = _due_set(CONCURRENT_DUE, now - 10)
    _add_due(redis_client, {**due, "2:future": now + 3600})
    scanner = _scanner(redis_client, time.time)
    barrier = threading.Barrier(8)
    results: list[list[str]] = [[] for _ in range(8)]

    def claimer(index: int) -> None:
        barrier.wait()
        results[index] = _claim_until_empty(scanner, 7)

    threads = [threading.Thread(target=claimer, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    _assert_disjoint_and_complete(results, due)


def _claim_in_process(url: str, barrier: Any, out: Any) -> None:
    client = redis.Redis.from_url(url)
    scanner = _scanner(client, time.time)
    barrier.wait()
    out.put(_claim_until_empty(scanner, 3))
    client.close()


def test_two_processes_claim_disjoint_sets_covering_exactly_the_due_ones(
    redis_client: redis.Redis, redis_server: Any
) -> None:
    now = time.time()
    due = _due_set(CONCURRENT_DUE, now - 10)
    _add_due(redis_client, {**due, "2:future": now + 3600})
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    out = context.Queue()
    processes = [
        context.Process(target=_claim_in_process, args=(redis_server.url, barrier, out))
        for _ in range(2)
    ]
    for process in processes:
        process.start()

    results = [out.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)

    assert [process.exitcode for process in processes] == [0, 0]
    _assert_disjoint_and_complete(results, due)


def test_tick_enqueues_what_it_claims(redis_client: redis.Redis) -> None:
    due = _due_set(5, NOW)
    _add_due(redis_client, {**due, "2:later": NOW + 60})
    scanner = _scanner(redis_client, Clock())
    enqueue, probe = Calls(), Calls()

    report = scanner.tick(enqueue, probe)

    assert report.claimed == 5 and not report.probe and report.paused is None
    assert enqueue.batches == [list(due)]
    assert probe.ids == []
    assert scanner.tick(enqueue, probe).claimed == 0
    assert len(enqueue.batches) == 1  # nothing due: nothing enqueued


@pytest.mark.parametrize(("backlog", "expected"), [(0, 10), (3, 7), (10, 0), (25, 0)])
def test_tick_claims_one_batch_minus_the_backlog(
    redis_client: redis.Redis, backlog: int, expected: int
) -> None:
    _add_due(redis_client, _due_set(30, NOW))
    scanner = _scanner(redis_client, Clock(), batch=10)
    enqueue = Calls()

    report = scanner.tick(enqueue, Calls(), backlog=backlog)

    assert report.claimed == expected
    assert len(enqueue.ids) == expected
    assert redis_client.zcount(DUE_INDEX, "-inf", NOW) == 30 - expected


@pytest.mark.parametrize(("backlog", "expected"), [(0, 6), (4, 2), (6, 0), (25, 0)])
def test_the_queue_holds_no_more_than_the_workers_can_start_within_half_a_lease(
    redis_client: redis.Redis, backlog: int, expected: int
) -> None:
    """At 0.1 rotations a second, half a lease of 120 s starts 6: a claim queued beyond them
    would run out before a worker took it, and its credential would be queued twice."""
    _add_due(redis_client, _due_set(30, NOW))
    scanner = _scanner(redis_client, Clock(), batch=10, start_rate=0.1)

    report = scanner.tick(Calls(), Calls(), backlog=backlog)

    assert report.claimed == expected


def test_a_paused_tick_claims_nothing_but_one_probe_per_probe_interval(
    redis_client: redis.Redis,
) -> None:
    due = _due_set(5, NOW)
    _add_due(redis_client, due)
    scanner = _scanner(redis_client, Clock(), probe_interval=1)
    scanner.guard.pause("test incident")
    enqueue, probe = Calls(), Calls()

    first = scanner.tick(enqueue, probe)
    second = scanner.tick(enqueue, probe)

    assert (first.claimed, first.probe, first.paused) == (1, True, "test incident")
    assert (second.claimed, second.probe, second.paused) == (0, False, "test incident")
    assert probe.ids == [next(iter(due))]
    assert enqueue.ids == []
    for credential_id in list(due)[1:]:  # the others are left where they were
        assert redis_client.zscore(DUE_INDEX, credential_id) == due[credential_id]

    started = time.monotonic()
    wait_for(lambda: scanner.tick(enqueue, probe).probe, 5, "the next probe interval")
    assert time.monotonic() - started > 0.5
    assert len(probe.ids) == 2 and len(set(probe.ids)) == 2
    assert enqueue.ids == []


def _median_tick_seconds(scanner: Scanner, rounds: int = 200) -> float:
    enqueue, probe = Calls(), Calls()
    durations = []
    for _ in range(rounds):
        started = time.perf_counter()
        scanner.tick(enqueue, probe)
        durations.append(time.perf_counter() - started)
    assert enqueue.ids == []
    return statistics.median(durations)


def _fill_future(client: redis.Redis, count: int) -> None:
    """``count`` entries, none of them due."""
    for start in range(0, count, 10_000):
        stop = min(start + 10_000, count)
        client.zadd(DUE_INDEX, {f"1:{index}": NOW + 10 + index for index in range(start, stop)})


def test_a_tick_with_nothing_due_reads_only_the_head_of_the_index(
    redis_client: redis.Redis,
) -> None:
    _fill_future(redis_client, 50_000)
    scanner = _scanner(redis_client, Clock())
    scanner.tick(Calls(), Calls())  # loads the script
    redis_client.config_resetstat()

    assert scanner.tick(Calls(), Calls()).claimed == 0

    stats = redis_client.info("commandstats")
    assert stats["cmdstat_zrangebyscore"]["calls"] == 1
    for scan_like in ("zadd", "zrange", "zscan", "zcard", "zcount", "scan", "keys"):
        assert f"cmdstat_{scan_like}" not in stats
    assert redis_client.zcard(DUE_INDEX) == 50_000


def test_tick_cost_does_not_grow_with_the_number_stored(redis_client: redis.Redis) -> None:
    scanner = _scanner(redis_client, Clock())
    _fill_future(redis_client, 500)
    small = _median_tick_seconds(scanner)
    redis_client.delete(DUE_INDEX)
    _fill_future(redis_client, 50_000)
    large = _median_tick_seconds(scanner)

    assert large < small * 5, f"500 entries: {small * 1e6:.0f} us, 50,000: {large * 1e6:.0f} us"


@pytest.mark.parametrize(
    ("count", "spread", "most", "sizes"),
    [
        (0, 64, 8, []),
        (5, 64, 8, [1] * 5),  # fewer than a worker's threads: one thread each
        (64, 64, 8, [1] * 64),
        (65, 64, 8, [2] * 32 + [1]),
        (200, 64, 8, [4] * 50),
        (5000, 64, 8, [8] * 625),  # a backlog: Celery's cost shared by the most allowed
        (3, 0, 8, [3]),  # a nonsense spread still gives messages
    ],
)
def test_claims_are_spread_over_threads_first_and_shared_only_beyond(
    count: int, spread: int, most: int, sizes: list[int]
) -> None:
    ids = [f"1:{index}" for index in range(count)]

    chunks = chunked(ids, spread, most)

    assert [len(chunk) for chunk in chunks] == sizes
    assert [item for chunk in chunks for item in chunk] == ids
