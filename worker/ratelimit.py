"""A rate limit on Miro's token endpoint, shared by every worker through Redis.

A burst of due credentials, or ``rotate --all`` over a million users, must not trip Miro's
limits: each call reserves a slot in ``scripts/reserve_rate.lua`` and sleeps until it. A
slot further away than ``max_wait`` is not taken; the rotation is rescheduled for then,
so a worker thread never sits on a credential's lock for long.
"""

from __future__ import annotations

import random
import time

from redis import Redis

from worker import scripts
from worker.constants import RATE_LIMIT_KEY
from worker.miro import RateLimited


class TokenRateLimit:
    """``rate`` calls per second across all processes, bursts of ``burst`` (default: rate)."""

    def __init__(self, redis: Redis, rate: float, burst: int = 0, max_wait: float = 5.0) -> None:
        self.rate = rate
        self.burst = burst or max(1, int(rate))
        self.max_wait = max_wait
        self._reserve = redis.register_script(scripts.source("reserve_rate"))

    def acquire(self) -> None:
        """Wait for a slot.

        Raises:
            RateLimited: the next free slot is more than ``max_wait`` away.
        """
        wait = float(
            self._reserve(keys=[RATE_LIMIT_KEY], args=[self.rate, self.burst, self.max_wait])
        )
        if wait < 0:
            retry_at = time.time() + self.max_wait * random.uniform(1, 2)
            raise RateLimited(f"MIRO_TOKEN_RATE={self.rate:g}/s is saturated", retry_at)
        if wait > 0:
            time.sleep(wait)
