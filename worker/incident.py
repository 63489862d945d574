"""Incidents: when refusals say "the app is broken", not "these users left".

A wrong client secret or a suspended app refuses every refresh, worded (perhaps) exactly as
the refusal of a user who removed the app. One credential's refusals never tell which: they
cost that credential alone (see :mod:`worker.rotation`). What the refusals of several
credentials have in common does. Counted in Redis across every worker since the last success,
refreshing pauses (and nobody is marked ``needs_reauth``) when Miro refused the refreshes of

- ``min_alive`` credentials whose grants it still honours (their access tokens pass token
  info, see :mod:`worker.evidence`): it refuses the app, not the users; or
- ``min_refused`` credentials, whatever the evidence, with no success in between.

A success (a refresh or a code exchange, anywhere) proves the app works: it clears the counts
and ends any pause. Refusals further apart than ``window`` do not add up: users leave one by
one over weeks, an incident refuses everyone at once.

While paused, the scan lets one probe refresh through per ``probe_interval``; the first
success resumes the service by itself, so fixing the secret and restarting the workers is
all an operator has to do. ``python -m worker resume`` resumes by hand.

Successes are also counted per app identity (a fingerprint of the client id and secret): a
credential is given up only once its app was seen working after its first refusal, and a
worker left with a wrong secret must not borrow the successes of one with the right secret.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis import Redis

from worker import replies
from worker.constants import PAUSED_KEY, PROBE_KEY, REFUSED_ALIVE_KEY, REFUSED_KEY, success_key
from worker.evidence import Evidence

log = logging.getLogger(__name__)


def app_fingerprint(client_id: str, client_secret: str) -> str:
    """The app's identity in Redis key names: a hash the secret cannot be recovered from.

    Miro's client secrets are random; a fingerprint of one only tells two settings apart.
    """
    return hashlib.sha256(f"{client_id}\n{client_secret}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Reading:
    """The guard as a refusal found it, in the round trip that counted the refusal."""

    #: Why refreshing is paused (now, perhaps by this very refusal), or None.
    paused: str | None
    #: The app's successes so far: a later reading above it means it was seen working since.
    successes: int


@dataclass
class IncidentGuard:
    """Counts refusals per credential since the last success; pauses refreshing on an incident."""

    redis: Redis
    #: The app's fingerprint (:func:`app_fingerprint`), under which its successes are counted.
    app: str = "app"
    window: int = 600
    min_alive: int = 2
    min_refused: int = 3
    probe_interval: int = 30
    clock: Callable[[], float] = time.time
    _last_reading: tuple[float, str | None] = field(
        default=(-math.inf, None), init=False, repr=False, compare=False
    )

    def record_success(self, count: int = 1) -> None:
        """Count successes. Each proves the app works: it clears the refusals and any pause."""
        key = success_key(self.app)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, "count", count)
            pipe.hset(key, "at", repr(self.clock()))
            pipe.delete(REFUSED_KEY, REFUSED_ALIVE_KEY)
            pipe.delete(PAUSED_KEY)
            resumed = pipe.execute()[-1]
        if resumed:
            self._last_reading = (-math.inf, None)
            log.warning("refreshing resumed: a refresh succeeded")

    def successes(self) -> int:
        """How many successes the app has had: compare with a :class:`Reading`'s."""
        return int(self.redis.hget(success_key(self.app), "count") or 0)

    def last_success_at(self) -> float | None:
        """When the app last succeeded (epoch seconds), if it ever did."""
        at = self.redis.hget(success_key(self.app), "at")
        return float(at) if at is not None else None

    def success_lately(self) -> float | None:
        """When the app last succeeded, if within the window and no incident is on since."""
        at = self.last_success_at()
        if at is None or self.clock() - at > self.window or self.paused() is not None:
            return None
        return at

    def record_refusal(self, credential_id: str, evidence: Evidence) -> Reading:
        """Count a refusal of this credential's refresh; pause if it makes an incident.

        Returns the guard's state read in the same round trip: a refusal is judged on a
        fresh reading of the pause.
        """
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(REFUSED_KEY, credential_id)
            if evidence is Evidence.GRANT_ALIVE:
                pipe.sadd(REFUSED_ALIVE_KEY, credential_id)
            for key in (REFUSED_KEY, REFUSED_ALIVE_KEY):
                pipe.expire(key, self.window)
            pipe.scard(REFUSED_KEY)
            pipe.scard(REFUSED_ALIVE_KEY)
            pipe.hget(success_key(self.app), "count")
            pipe.get(PAUSED_KEY)
            *_, refused, alive_refused, successes, paused = pipe.execute()
        reason = paused.decode() if paused is not None else None
        if reason is None:
            reason = self._incident(refused, alive_refused)
            if reason:
                self.pause(reason)
        self._last_reading = (time.monotonic(), reason)
        return Reading(reason, int(successes or 0))

    def _incident(self, refused: int, alive_refused: int) -> str | None:
        """Why these counts of credentials refused since the last success are an incident."""
        if alive_refused >= self.min_alive:
            return (
                f"Miro refused the refreshes of {alive_refused} credentials whose access tokens "
                "it still honours: it refuses the app's client id or secret "
                "(MIRO_CLIENT_ID/SECRET), or the app is suspended"
            )
        if refused >= self.min_refused:
            return (
                f"Miro refused the refreshes of {refused} credentials with no success in "
                "between: the app's client id or secret (MIRO_CLIENT_ID/SECRET) may be refused, "
                "or Miro is failing"
            )
        return None

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
        reason = replies.text(raw) if raw is not None else None
        self._last_reading = (now, reason)
        return reason

    def resume(self) -> bool:
        """Resume by hand; the refusals counted so far are forgiven with the pause."""
        self._last_reading = (-math.inf, None)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(REFUSED_KEY, REFUSED_ALIVE_KEY)
            pipe.delete(PAUSED_KEY)
            resumed = bool(pipe.execute()[-1])
        if resumed:
            log.warning("refreshing resumed")
        return resumed

    def take_probe(self) -> bool:
        """Whether this caller may send the one probe refresh of this interval."""
        return bool(self.redis.set(PROBE_KEY, "1", nx=True, ex=self.probe_interval))
