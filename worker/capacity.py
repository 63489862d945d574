"""Capacity: the refresh rate the stored credentials need, beside what may and can be done.

Three figures, each read in O(log N) at most, and compared:

- the **need**, in refreshes per second, is the larger of two readings of the due index.
  *Steady*: the credentials on a schedule (the index's size) over the policy's refresh cycle. In
  ``eager`` an access token is refreshed ``ACCESS_REFRESH_MARGIN`` plus on average half its
  jitter before Miro's documented lifetime runs out, and every refresh also renews the refresh
  token, so nothing is added for those; in ``keepalive`` the refresh token is renewed
  ``REFRESH_TOKEN_MARGIN`` plus half its jitter before ``REFRESH_TOKEN_LIFETIME``. *Due soon*:
  what comes due within one margin from now, the overdue included, over that margin, since a
  credential can wait about its margin before its token expires. The second catches what
  the first assumes away: tokens shorter-lived than documented, a backlog after a pause, a
  million users imported at once and all due in the same minutes.
- ``MIRO_TOKEN_RATE``, as the workers seen enforce it (their own setting, published with
  their reports; the reader's own setting when no worker is seen).
- the **worker capacity**: the sum over the workers seen in the last ``REPORT_TTL``
  seconds of what each says it can do (see :mod:`worker.meter`).

The need exceeding either is a shortfall: tokens would start to expire.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from settings import Settings
from worker import replies
from worker.constants import DUE_INDEX, WORKERS, worker_key
from worker.miro import DEFAULT_ACCESS_LIFETIME
from worker.schedule import JITTER_FRACTION

#: Seconds between two reports of a worker.
REPORT_INTERVAL = 5.0
#: A worker not heard from for this long is gone: a few missed reports, not one.
REPORT_TTL = 3 * REPORT_INTERVAL
#: The shortest window the due-soon reading counts over: a margin of seconds would make
#: it jump with every refresh.
MIN_DUE_SOON_WINDOW = 60.0

TOKEN_RATE = "MIRO_TOKEN_RATE"
WORKERS_SHORT = "workers"


def per_second(rate: float) -> str:
    """A rate as people read it: three significant digits, whole numbers from 100 up."""
    return f"{rate:,.0f}/s" if rate >= 100 else f"{rate:.3g}/s"


@dataclass(frozen=True)
class WorkerReport:
    """What one worker process says it can do; published every ``REPORT_INTERVAL``.

    Attributes:
        name: the worker's Celery node name (``celery@host``).
        threads: its pool's threads.
        refresh_seconds: the smoothed wall time of one credential's refresh, Miro's answer
            and the Redis round trips included, waits for a ``MIRO_TOKEN_RATE`` slot left
            out; None until it has refreshed something.
        capacity: refreshes per second it can do: ``threads / refresh_seconds``, or, not yet
            measured, ``threads / HTTP_TIMEOUT``, the floor no call to Miro can go under.
        throughput: credentials per second it handled over its last interval.
        token_rate: its ``MIRO_TOKEN_RATE``, the limit it enforces.
    """

    name: str
    threads: int
    refresh_seconds: float | None
    capacity: float
    throughput: float
    token_rate: float

    @property
    def measured(self) -> bool:
        return self.refresh_seconds is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> WorkerReport:
        return cls(**json.loads(data))


def publish(client: redis.Redis, report: WorkerReport) -> None:
    """Store the report for ``REPORT_TTL`` seconds; Redis's clock decides who is gone."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(worker_key(report.name), report.to_json(), ex=math.ceil(REPORT_TTL))
        pipe.sadd(WORKERS, report.name)
        pipe.execute()


def withdraw(client: redis.Redis, name: str) -> None:
    """Take a stopping worker out at once, rather than when its report expires."""
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(worker_key(name))
        pipe.srem(WORKERS, name)
        pipe.execute()


def read_reports(client: redis.Redis) -> tuple[list[WorkerReport], list[str]]:
    """The reports of the workers seen recently, and the names whose report has expired.

    Names come from a set, not a ``SCAN`` (which would walk every credential's key).
    """
    names = sorted(replies.texts(client.smembers(WORKERS)))
    values = client.mget([worker_key(name) for name in names]) if names else []
    reports, gone = [], []
    for name, value in zip(names, values, strict=True):
        if value is None:
            gone.append(name)
        else:
            reports.append(WorkerReport.from_json(value))
    return reports, gone


def forget(client: redis.Redis, names: Sequence[str]) -> None:
    """Drop the names of workers whose reports have expired, so the set stays small."""
    if names:
        client.srem(WORKERS, *names)


def refresh_cycle(settings: Settings) -> float:
    """Seconds between two scheduled refreshes of one credential under the policy, on average."""
    if settings.refresh_policy == "eager":
        lifetime, margin = float(DEFAULT_ACCESS_LIFETIME), settings.access_refresh_margin
    else:
        lifetime, margin = settings.refresh_token_lifetime, settings.refresh_token_margin
    return max(1.0, lifetime - margin * (1 + JITTER_FRACTION / 2))


def due_soon_window(settings: Settings) -> float:
    """The policy's margin: about how long a credential due now can wait before it expires."""
    eager = settings.refresh_policy == "eager"
    margin = settings.access_refresh_margin if eager else settings.refresh_token_margin
    return max(MIN_DUE_SOON_WINDOW, margin)


@dataclass(frozen=True)
class Capacity:
    """The need beside the limit and the workers; rates are per second."""

    needed: float
    steady: float
    due_soon: float
    token_rate: float
    workers: int
    unmeasured_workers: int
    worker_capacity: float
    worker_throughput: float

    @property
    def short_of(self) -> list[str]:
        """What falls short of the need: ``MIRO_TOKEN_RATE``, ``workers``, both or none."""
        short = []
        if self.needed > self.token_rate:
            short.append(TOKEN_RATE)
        if self.needed > self.worker_capacity:
            short.append(WORKERS_SHORT)
        return short

    def shortfalls(self) -> dict[str, str]:
        """Each shortfall (see :attr:`short_of`) as a sentence that names it and says what to do."""
        sentences = {}
        if TOKEN_RATE in self.short_of:
            sentences[TOKEN_RATE] = (
                f"the stored credentials need {per_second(self.needed)} refreshes but "
                f"MIRO_TOKEN_RATE allows {per_second(self.token_rate)}: raise it to at least "
                f"{math.ceil(self.needed)} (if Miro allows your app that rate)"
            )
        if WORKERS_SHORT in self.short_of:
            sentences[WORKERS_SHORT] = (
                f"the stored credentials need {per_second(self.needed)} refreshes but "
                + self._workers_shortfall()
            )
        return sentences

    def _workers_shortfall(self) -> str:
        if not self.workers:
            return (
                f"no worker has been seen in the last {REPORT_TTL:g} s: start one "
                "(`celery -A worker worker`)"
            )
        each = self.worker_capacity / self.workers
        more = math.ceil((self.needed - self.worker_capacity) / each) if each else 1
        unmeasured = (
            f" ({self.unmeasured_workers} not yet measured, counted at threads / HTTP_TIMEOUT)"
            if self.unmeasured_workers
            else ""
        )
        return (
            f"the {self.workers} workers seen can do {per_second(self.worker_capacity)}"
            f"{unmeasured}: start {more} more like them (about {per_second(each)} each), or "
            "raise WORKER_CONCURRENCY"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "short_of": self.short_of}


def needed_rates(client: redis.Redis, settings: Settings, now: float) -> tuple[float, float]:
    """The steady and the due-soon readings of the need (see the module's docstring)."""
    window = due_soon_window(settings)
    with client.pipeline(transaction=False) as pipe:
        pipe.zcard(DUE_INDEX)
        pipe.zcount(DUE_INDEX, "-inf", now + window)
        scheduled, due_soon = pipe.execute()
    return scheduled / refresh_cycle(settings), due_soon / window


def summarize(
    settings: Settings, steady: float, due_soon: float, reports: Sequence[WorkerReport]
) -> Capacity:
    """The need beside the limit the workers enforce and what they can do."""
    token_rates = [report.token_rate for report in reports]
    return Capacity(
        needed=max(steady, due_soon),
        steady=steady,
        due_soon=due_soon,
        token_rate=min(token_rates) if token_rates else settings.miro_token_rate,
        workers=len(reports),
        unmeasured_workers=sum(not report.measured for report in reports),
        worker_capacity=sum(report.capacity for report in reports),
        worker_throughput=sum(report.throughput for report in reports),
    )


def read_capacity(
    client: redis.Redis, settings: Settings, now: float | None = None
) -> tuple[Capacity, list[str]]:
    """The capacity figures, and the names of workers gone (for a publisher to forget)."""
    steady, due_soon = needed_rates(client, settings, time.time() if now is None else now)
    reports, gone = read_reports(client)
    return summarize(settings, steady, due_soon, reports), gone
