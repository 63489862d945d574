"""What a rotation reports: its outcome, and the state changes people are told about.

Plain values, apart from the rotator that makes them, so that what only reads them (the
notifications, the tasks, the CLI, the web app's metrics) need not import the rotation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum

from worker.credential import State


class Outcome(StrEnum):
    ROTATED = "rotated"
    #: Rotated at Miro, but Redis was down: the pair waits in the journal.
    JOURNALED = "journaled"
    SKIPPED_FRESH = "skipped_fresh"
    #: Another process rotated it first (seen after the lock, or as a refusal of a used token).
    LOST_RACE = "lost_race"
    RESCHEDULED = "rescheduled"
    RATE_LIMITED = "rate_limited"
    #: Refreshing is paused by an incident; nothing was sent to Miro.
    PAUSED = "paused"
    NEEDS_REAUTH = "needs_reauth"
    BUSY = "busy"
    NOT_EXPIRING = "not_expiring"
    INACTIVE = "inactive"
    MISSING = "missing"
    UNREADABLE = "unreadable"
    #: A reconnect replaced the grant while we were rotating the old one.
    SUPERSEDED = "superseded"
    #: An unexpected error (Redis unreachable before Miro was called, a bug): nothing changed,
    #: and the scan's lease on the claim brings the credential back.
    FAILED = "failed"


@dataclass(frozen=True)
class RotationResult:
    """What happened; safe to log, return from a task and show in Flower (no secrets)."""

    credential_id: str
    outcome: Outcome
    version: int | None = None
    detail: str | None = None
    retry_at: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class StateChange:
    """A credential moved between states (e.g. into or out of ``needs_reauth``)."""

    credential_id: str
    old: State
    new: State
    error: str | None


#: Told of every state change (see :mod:`worker.notify`).
Listener = Callable[[StateChange], None]
