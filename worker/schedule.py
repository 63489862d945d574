"""When a credential is due, and when to try again after a failure. Pure functions."""

from __future__ import annotations

import random
from dataclasses import dataclass

from settings import Settings
from worker.credential import Credential, State

#: Jitter spreads credentials created together over this fraction of the margin.
JITTER_FRACTION = 0.1
BACKOFF_BASE = 5.0
BACKOFF_CAP = 300.0
#: A failing credential is retried at least this long before its refresh token dies.
LAST_CHANCE = 60.0
#: A failing credential's retry that would land after its access token's expiry is brought
#: forward, once, to this fraction of the access margin before it (eager policy).
ACCESS_LAST_CHANCE_FRACTION = 0.25
#: An access token handed out must stay valid at least this long (or the access margin,
#: if shorter).
MIN_ACCESS_VALIDITY = 60.0


@dataclass(frozen=True)
class Policy:
    """The schedule's knobs, taken from the settings."""

    access_margin: float
    refresh_margin: float
    eager: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            access_margin=settings.access_refresh_margin,
            refresh_margin=settings.refresh_token_margin,
            eager=settings.refresh_policy == "eager",
        )

    def due_at(self, credential: Credential, rng: random.Random | None = None) -> float | None:
        """When the scan should next pick this credential up; None for never.

        The earlier of "access token about to expire" (eager policy only) and "refresh token
        about to expire", minus up to 10% of the margin at random, so that credentials
        connected together do not all refresh in the same second.
        """
        if credential.state is not State.ACTIVE or not credential.expires:
            return None
        candidates = []
        if self.eager and credential.access_expires_at is not None:
            candidates.append((credential.access_expires_at, self.access_margin))
        if credential.refresh_expires_at is not None:
            candidates.append((credential.refresh_expires_at, self.refresh_margin))
        if not candidates:
            return None
        expiry, margin = min(candidates, key=lambda item: item[0] - item[1])
        jitter = (rng or random).uniform(0, margin * JITTER_FRACTION)
        return expiry - margin - jitter

    @property
    def access_last_chance(self) -> float | None:
        """When a failing credential is tried once more, in seconds before its access expiry.

        ``None`` where access tokens are not kept fresh (``keepalive``).
        """
        return self.access_margin * ACCESS_LAST_CHANCE_FRACTION if self.eager else None

    def is_due(self, credential: Credential, now: float) -> bool:
        """Whether a refresh now is warranted: within a margin (plus its jitter) of an expiry.

        Every time :meth:`due_at` can return is due by this test, so a credential the scan
        claimed is never turned away as fresh.
        """
        if not credential.expires:
            return False
        if (
            self.eager
            and credential.access_expires_at is not None
            and now >= credential.access_expires_at - self.access_margin * (1 + JITTER_FRACTION)
        ):
            return True
        return (
            credential.refresh_expires_at is not None
            and now >= credential.refresh_expires_at - self.refresh_margin * (1 + JITTER_FRACTION)
        )

    def must_refresh_before_use(self, credential: Credential, now: float) -> bool:
        """Whether an access token about to be handed out should be refreshed first.

        Due, or about to expire (in ``keepalive`` access tokens are refreshed only this way).
        """
        return self.is_due(credential, now) or self.access_expiring(credential, now)

    def access_expiring(self, credential: Credential, now: float) -> bool:
        """Whether a call made now with the access token could meet its expiry."""
        validity = min(MIN_ACCESS_VALIDITY, self.access_margin)
        return (
            credential.expires
            and credential.access_expires_at is not None
            and now >= credential.access_expires_at - validity
        )


def backoff(failures: int) -> float:
    """The longest wait after ``failures`` in a row: 5 s, doubling, up to 5 minutes."""
    doublings = min(max(failures - 1, 0), 16)  # past the cap long before 2**16
    return min(BACKOFF_CAP, BACKOFF_BASE * 2.0**doublings)


def retry_at(
    credential: Credential,
    failures: int,
    now: float,
    rng: random.Random | None = None,
    *,
    access_last_chance: float | None = None,
) -> float:
    """Exponential backoff with full jitter, never past the refresh token's last minute.

    With ``access_last_chance``, a retry that would land after the access token's expiry
    lands that many seconds before it instead (plus a little jitter, and at least a second
    from now), if that is still ahead: a few failures in a row during a short blip at Miro
    then cost no expired access token. Once that moment has passed, the backoff is left
    alone: an outage must not turn into retries every second.
    """
    uniform = (rng or random).uniform
    delay = backoff(failures)
    when = now + uniform(delay / 2, delay)
    if access_last_chance is not None and credential.access_expires_at is not None:
        last_chance = credential.access_expires_at - access_last_chance
        if now < last_chance < when:
            # Later, never earlier, by up to a tenth: credentials connected together share an
            # expiry, and should not all come back in the same second after an outage.
            spread = uniform(0, access_last_chance * JITTER_FRACTION)
            when = min(when, max(now + 1, last_chance + spread))
    if credential.refresh_expires_at is not None:
        when = min(when, max(now + 1, credential.refresh_expires_at - LAST_CHANCE))
    return when
