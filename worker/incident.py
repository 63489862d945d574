"""Incidents: when failures say "the app is broken", not "this user left".

A wrong client secret, or a Miro outage that answers every refresh with a refusal, looks
from one credential exactly like a user who revoked the app. Marking credentials dead then
would force every user to reconnect. So refresh outcomes are counted in Redis across all
workers, and refreshing pauses (and nobody is marked ``needs_reauth``) when:

- Miro refuses the app's own credentials, or
- within one window, most of at least ``min_events`` refreshes were refused.

While paused, the scan lets one probe refresh through per ``probe_interval``; the first
success resumes the service by itself, so fixing the secret and restarting the workers is
all an operator has to do. ``python -m worker resume`` resumes by hand.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from redis import Redis

from worker.constants import HEALTH_WINDOW_KEY, PAUSED_KEY, PROBE_KEY

log = logging.getLogger(__name__)


class Signal(StrEnum):
    """How one refresh call ended, as far as the health of the whole app goes."""

    OK = "ok"
    REFUSED = "refused"
    CLIENT_REFUSED = "client_refused"
    TRANSIENT = "transient"


@dataclass
class IncidentGuard:
    """Counts refresh signals per time window and pauses refreshing on an incident."""

    redis: Redis
    window: int = 60
    min_events: int = 20
    refused_ratio: float = 0.5
    probe_interval: int = 30
    clock: Callable[[], float] = time.time
    _last_reading: tuple[float, str | None] = field(
        default=(-math.inf, None), init=False, repr=False, compare=False
    )

    def _window_key(self) -> str:
        return HEALTH_WINDOW_KEY.format(window=int(self.clock()) // self.window)

    def record(self, signal: Signal, count: int = 1) -> None:
        """Count refresh signals. A success proves the app works: it ends any pause."""
        key = self._window_key()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, signal.value, count)
            pipe.expire(key, self.window * 2)
            if signal is Signal.OK:
                pipe.delete(PAUSED_KEY)
            results = pipe.execute()
        if signal is Signal.OK and results[-1]:
            log.warning("refreshing resumed: a refresh succeeded")
        if signal is Signal.CLIENT_REFUSED:
            self.pause("Miro refused the app's client credentials (MIRO_CLIENT_ID/SECRET)")

    def mass_refusal(self) -> bool:
        """Whether refusals dominate this window: a sign of an incident, not of users leaving."""
        counts = {
            name.decode(): int(value)
            for name, value in self.redis.hgetall(self._window_key()).items()
        }
        total = sum(counts.values())
        refused = counts.get(Signal.REFUSED.value, 0)
        if total >= self.min_events and refused > total * self.refused_ratio:
            self.pause(f"{refused} of {total} refreshes refused by Miro within {self.window} s")
            return True
        return False

    def pause(self, reason: str) -> None:
        self._last_reading = (-math.inf, None)  # this process sees its own pause at once
        if self.redis.set(PAUSED_KEY, reason, nx=True):
            log.critical(
                "INCIDENT: refreshing is PAUSED: %s. No credential is marked dead meanwhile. "
                "It resumes by itself after a successful probe refresh, or with "
                "`python -m worker resume`.",
                reason,
            )

    def paused(self, max_age: float = 0.0) -> str | None:
        """Why refreshing is paused, or None.

        Args:
            max_age: seconds a reading this process took earlier stays good for. Deciding
                whether to call Miro may take an old one: a pause seen a second late costs
                one call at most, and a refusal is judged on a fresh reading.
        """
        read_at, reason = self._last_reading
        now = time.monotonic()
        if now - read_at < max_age:
            return reason
        raw = self.redis.get(PAUSED_KEY)
        reason = raw.decode() if raw is not None else None
        self._last_reading = (now, reason)
        return reason

    def resume(self) -> bool:
        self._last_reading = (-math.inf, None)
        resumed = bool(self.redis.delete(PAUSED_KEY))
        if resumed:
            log.warning("refreshing resumed")
        return resumed

    def take_probe(self) -> bool:
        """Whether this caller may send the one probe refresh of this interval."""
        return bool(self.redis.set(PROBE_KEY, "1", nx=True, ex=self.probe_interval))
