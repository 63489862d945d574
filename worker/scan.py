"""The scan: which credentials to refresh now, claimed so that each is handed out once.

Cost grows with the number due, never with the number stored: the due index is a sorted
set and a tick reads only its head (``scripts/claim_due.lua``). Beat runs a tick every
``SCAN_INTERVAL`` (``tasks/beat.py``); the enqueueing itself is Celery's business and is
passed in, so this module is testable without a broker.

A claim lasts a short lease: a worker renews the claims of the tasks it holds
(``claims.py``), but nobody renews those of tasks still waiting in the queue. So the queue is
kept no longer than the workers can start within half a lease, at the rate Miro's token
endpoint is shared at (``MIRO_TOKEN_RATE``, which bounds how fast rotations start): a claim
running out in the queue would have its credential queued a second time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis import Redis

from worker import scripts
from worker.constants import DUE_INDEX
from worker.incident import IncidentGuard

log = logging.getLogger(__name__)

#: The part of a lease a claimed credential may wait in the queue; the rest is left for the
#: worker that takes it to renew the claim.
QUEUE_SHARE_OF_LEASE = 0.5

Enqueue = Callable[[Sequence[str]], None]


@dataclass(frozen=True)
class TickReport:
    claimed: int
    probe: bool = False
    paused: str | None = None


def chunked(ids: Sequence[str], spread: int, most: int) -> list[list[str]]:
    """The claimed ids cut into task messages: shared, but never at the cost of parallelism.

    Celery's own work per message costs several refreshes' worth of CPU, so up to ``most``
    ids share one; but a message's ids are rotated one after the other, so as long as there
    are fewer than ``spread`` (a worker's threads) each id gets its own message and its own
    thread, and beyond that they are spread evenly.
    """
    size = max(1, min(most, math.ceil(len(ids) / max(1, spread))))
    return [list(ids[start : start + size]) for start in range(0, len(ids), size)]


class Scanner:
    """Claims due credentials in batches, or a single probe while refreshing is paused."""

    def __init__(
        self,
        redis: Redis,
        guard: IncidentGuard,
        batch: int,
        lease: float,
        *,
        start_rate: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """A scanner of the due index of ``redis``.

        Args:
            redis: the store's Redis.
            guard: tells whether refreshing is paused, and hands out its probes.
            batch: the most credentials one tick claims.
            lease: seconds a claim hides its credential from the next ticks.
            start_rate: how many rotations a second the workers can start, at most.
            clock: epoch seconds, the clock of the due index.
        """
        self.guard = guard
        self.lease = lease
        self.clock = clock
        #: The most credentials left waiting in the queue.
        self.most_queued = min(batch, max(1, int(start_rate * lease * QUEUE_SHARE_OF_LEASE)))
        self._claim = redis.register_script(scripts.source("claim_due"))

    def claim(self, limit: int) -> list[str]:
        if limit <= 0:
            return []
        now = self.clock()
        claimed = self._claim(keys=[DUE_INDEX], args=[repr(now), repr(now + self.lease), limit])
        return [item.decode() for item in claimed]

    def tick(self, enqueue: Enqueue, enqueue_probe: Enqueue, backlog: int = 0) -> TickReport:
        """One beat: claim what is due (minus what still waits in the queue) and enqueue it.

        Args:
            enqueue: queues the scheduled refresh of each id.
            enqueue_probe: queues a forced refresh of one id, to test a paused service.
            backlog: refreshes already queued; claiming stops at ``most_queued`` of them,
                so no claim runs out in the queue, and an outage's backlog never piles up
                copies of itself.
        """
        reason = self.guard.paused()
        if reason:
            probe = self.claim(1) if self.guard.take_probe() else []
            enqueue_probe(probe)
            return TickReport(len(probe), probe=bool(probe), paused=reason)
        ids = self.claim(self.most_queued - backlog)
        if ids:
            enqueue(ids)
            log.info("scan claimed %d due credentials", len(ids))
        return TickReport(len(ids))
