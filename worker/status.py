"""The service's health in numbers, read in O(log N) from aggregates the writes keep.

Counts by state come from a hash the write scripts maintain; "overdue" is a range count on
the due index; the soonest expiries are read from the head of the due index (the
credentials due first are the ones expiring first, give or take their jitter); the failing
ones come from a small sorted set; the capacity figures from the due index and the workers'
reports (:mod:`worker.capacity`). Nothing here reads every record.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any

from settings import Settings
from worker import replies
from worker.capacity import Capacity, read_capacity
from worker.constants import (
    DUE_INDEX,
    FAILING,
    OUTCOME_COUNTERS,
    STATE_COUNTS,
    credential_key,
)
from worker.credential import CredentialId
from worker.record import CorruptRecordError, RawRecord
from worker.vault import Vault

#: How many of the first-due credentials are read to find the soonest expiries.
HEAD_SAMPLE = 200
FAILING_SHOWN = 50


@dataclass(frozen=True)
class Status:
    credentials: int
    by_state: dict[str, int]
    overdue: int
    soonest_access_expiry_in: float | None
    soonest_refresh_expiry_in: float | None
    paused: str | None
    journal_pending: int
    refreshes_by_outcome: dict[str, int]
    capacity: Capacity
    failing: list[dict[str, Any]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return (
            not self.overdue
            and not self.paused
            and not self.journal_pending
            and not self.capacity.short_of
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "capacity": self.capacity.as_dict(), "healthy": self.healthy}


def overdue_grace(settings: Settings) -> float:
    """How late a credential may be before it counts as overdue: a few scans' worth."""
    return 3 * settings.scan_interval + 60


def _counts(vault: Vault, key: str) -> dict[str, int]:
    counts = {replies.text(name): int(value) for name, value in vault.redis.hgetall(key).items()}
    return {name: value for name, value in sorted(counts.items()) if value}


def _soonest_expiries(vault: Vault, now: float) -> tuple[float | None, float | None]:
    ids = replies.texts(vault.redis.zrange(DUE_INDEX, 0, HEAD_SAMPLE - 1))
    records = vault.redis.mget([credential_key(item) for item in ids]) if ids else []
    access, refresh = [], []
    for data in records:
        if data is None:
            continue
        try:
            header = RawRecord.parse(replies.data(data)).header
        except CorruptRecordError:
            continue
        if header.get("ae"):
            access.append(header["ae"] - now)
        if header.get("re"):
            refresh.append(header["re"] - now)
    return (min(access) if access else None, min(refresh) if refresh else None)


def _failing(vault: Vault) -> list[dict[str, Any]]:
    ids = [
        CredentialId.parse(item)
        for item in replies.texts(vault.redis.zrevrange(FAILING, 0, FAILING_SHOWN - 1))
    ]
    return [
        {key: row.get(key) for key in ("id", "state", "failure_count", "last_error")}
        for row in vault.store.describe(ids)
    ]


def read_status(vault: Vault, now: float | None = None) -> Status:
    now = time.time() if now is None else now
    by_state = _counts(vault, STATE_COUNTS)
    access_in, refresh_in = _soonest_expiries(vault, now)
    return Status(
        credentials=sum(by_state.values()),
        by_state=by_state,
        overdue=vault.redis.zcount(DUE_INDEX, "-inf", now - overdue_grace(vault.settings)),
        soonest_access_expiry_in=access_in,
        soonest_refresh_expiry_in=refresh_in,
        paused=vault.rotator.guard.paused(),
        journal_pending=vault.rotator.journal.pending_count(),
        refreshes_by_outcome=_counts(vault, OUTCOME_COUNTERS),
        capacity=read_capacity(vault.redis, vault.settings, now)[0],
        failing=_failing(vault),
    )


def recount_states(vault: Vault) -> dict[str, int]:
    """Rebuild the counts by state from every record's header: O(N), for repairs only.

    The write scripts keep the counts exact, except around records corrupted from outside
    (their former state is unknown); this puts them right.
    """
    counts: Counter[str] = Counter()
    for credential_id in vault.store.ids():
        data = vault.store.raw(credential_id)
        if data is None:
            continue
        try:
            counts[RawRecord.parse(data).state.value] += 1
        except CorruptRecordError:
            counts["corrupt"] += 1
    with vault.redis.pipeline(transaction=True) as pipe:
        pipe.delete(STATE_COUNTS)
        if counts:
            pipe.hset(STATE_COUNTS, items=list(chain.from_iterable(counts.items())))
        pipe.execute()
    return dict(counts)
