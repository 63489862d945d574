"""A rate limit on Miro's token endpoint, shared by every worker through Redis.

A burst of due credentials, or ``rotate --all`` over a million users, must not trip Miro's
limits. Each rotation reserves a slot in the same script that takes its credential's lock
(``scripts/take_lock.lua``: no round trip of its own) and sleeps here until the slot. A
slot further away than ``max_wait`` is not taken; the rotation is rescheduled for then, so
a worker thread never sits on a credential's lock for long.
"""

from __future__ import annotations

import random
import threading
import time

from worker.constants import RATE_LIMIT_KEY
from worker.miro import RateLimited

_waits = threading.local()


def waited_in_this_thread() -> float:
    """Seconds this thread has slept waiting for slots, all told.

    A worker's measure of its own refresh time leaves these out: time queued behind
    ``MIRO_TOKEN_RATE`` says nothing of what the worker could do under a higher limit.
    """
    return getattr(_waits, "seconds", 0.0)


class TokenRateLimit:
    """``rate`` calls per second across all processes, bursts of ``burst`` (default: rate)."""

    key = RATE_LIMIT_KEY

    def __init__(self, rate: float, burst: int = 0, max_wait: float = 5.0) -> None:
        self.rate = rate
        self.burst = burst or max(1, int(rate))
        self.max_wait = max_wait

    def script_args(self) -> list[float]:
        """The limit as ``take_lock.lua`` reads it."""
        return [self.rate, self.burst, self.max_wait]

    def slot_length(self) -> str:
        """Seconds between two calls, as ``release_lock.lua`` reads it to give a slot back."""
        return repr(1 / self.rate)

    def wait_for(self, slot: float) -> None:
        """Sleep the ``slot`` seconds the reservation said its slot was away.

        Raises:
            RateLimited: no slot was free within ``max_wait`` (``slot`` is negative).
        """
        if slot < 0:
            retry_at = time.time() + self.max_wait * random.uniform(1, 2)
            raise RateLimited(f"MIRO_TOKEN_RATE={self.rate:g}/s is saturated", retry_at)
        if slot > 0:
            time.sleep(slot)
            _waits.seconds = waited_in_this_thread() + slot
