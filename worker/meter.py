"""A worker's measure of what it can do: its threads over the time one refresh takes.

Each refresh task adds its wall time and its number of credentials to two sums in memory
(no Redis round trip per refresh); every report folds them into sums that forget the past
over about ``MEMORY`` seconds of work, and their ratio is the refresh time reported. A worker that
has refreshed nothing yet has no time to report, and is counted at ``threads /
HTTP_TIMEOUT``: no call to Miro lasts longer, so it can do at least that.

The time measured is the one threads spend under the present load, so it is an upper bound
when the process would run out of CPU first: with the GIL a process does about a core's
worth of refreshes at most, and many threads over a fast Miro reach that before their count.
"""

from __future__ import annotations

import math
import threading

from worker.capacity import WorkerReport

#: Seconds over which the reported refresh time forgets what was measured before.
MEMORY = 60.0


class RefreshMeter:
    """Sums refresh time in memory; :meth:`report` turns it into a :class:`WorkerReport`."""

    def __init__(self, name: str, threads: int, floor_seconds: float, token_rate: float) -> None:
        self.name = name
        self.threads = threads
        self.floor_seconds = floor_seconds
        self.token_rate = token_rate
        self._lock = threading.Lock()
        self._busy = 0.0
        self._credentials = 0
        self._remembered_busy = 0.0
        self._remembered_credentials = 0.0

    def record(self, seconds: float, credentials: int) -> None:
        """One task's refreshes: ``credentials`` of them in ``seconds`` of a thread's time."""
        with self._lock:
            self._busy += seconds
            self._credentials += credentials

    def report(self, elapsed: float) -> WorkerReport:
        """What the worker can do, ``elapsed`` seconds after the previous report."""
        with self._lock:
            busy, credentials = self._busy, self._credentials
            self._busy, self._credentials = 0.0, 0
        if credentials:  # an idle spell keeps the last measure: it is still the latest
            fading = math.exp(-elapsed / MEMORY)
            self._remembered_busy = self._remembered_busy * fading + busy
            self._remembered_credentials = self._remembered_credentials * fading + credentials
        refresh_seconds = (
            self._remembered_busy / self._remembered_credentials
            if self._remembered_busy > 0
            else None
        )
        return WorkerReport(
            name=self.name,
            threads=self.threads,
            refresh_seconds=refresh_seconds,
            capacity=self.threads / (refresh_seconds or self.floor_seconds),
            throughput=credentials / elapsed if elapsed > 0 else 0.0,
            token_rate=self.token_rate,
        )
