"""The waits between tries of a Redis call that failed for now, until a deadline.

Both writes that must not be lost to a passing outage wait this way: a rotation's commit
(then journaled) and a write of new grants (then raised). The first wait is short, since a
dropped connection is back at once; then it doubles up to a second, since a restarting
Redis takes seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

FIRST_WAIT = 0.05
LONGEST_WAIT = 1.0


class Backoff:
    """The waits of one call, for ``seconds`` from now by ``clock``."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deadline = clock() + seconds
        self._next = FIRST_WAIT
        #: How many waits so far: 0 before the first failure is waited out.
        self.waits = 0

    def wait(self) -> bool:
        """Sleep before the next try (never past the deadline); False once it has passed."""
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            return False
        time.sleep(min(self._next, remaining))
        self._next = min(self._next * 2, LONGEST_WAIT)
        self.waits += 1
        return True
