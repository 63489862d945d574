"""Single flight: one refresh of a credential at a time, across threads, processes and hosts.

A refresh token is single-use, so two refreshes of one credential at once would kill it.
The lock is a key holding its owner's random token, set only if absent and with a TTL that
outlives the HTTP timeout plus the commit retries, counted from the moment its rate-limit slot
comes due, so it cannot expire under a rotation that is still going to write; only its owner
lets it go (a compare-and-delete).

It is taken by ``scripts/take_lock.lua``, which reads the credential's record in the same
step (and, for a rotation, reserves its slot at Miro's token endpoint), and let go by the
commit's own script (``write_if_version.lua``) or, on every other path, by
``scripts/release_lock.lua``: a rotation's lock costs no round trip of its own.
redis-py's ``Lock`` keeps the same format (its tests take the lock over with it) but cannot
share a round trip with anything else.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from redis import Redis
from redis.commands.core import Script
from redis.exceptions import RedisError

from worker import redis_errors, scripts
from worker.constants import credential_key, lock_key
from worker.ratelimit import TokenRateLimit

log = logging.getLogger(__name__)

#: How often a waiting caller polls the lock; short, so forced rotations queue tightly.
POLL_INTERVAL = 0.01

#: The take and release scripts of each Redis client, registered once (hashing a script on
#: every rotation would be work for nothing).
_scripts: WeakKeyDictionary[Redis, tuple[Script, Script]] = WeakKeyDictionary()


def _lock_scripts(redis: Redis) -> tuple[Script, Script]:
    pair = _scripts.get(redis)
    if pair is None:
        pair = _scripts[redis] = (
            redis.register_script(scripts.source("take_lock")),
            redis.register_script(scripts.source("release_lock")),
        )
    return pair


@dataclass
class Flight:
    """One caller's turn at a credential: whether it holds the lock, and what it read under it."""

    credential_id: str
    #: The random token that proves ownership of the lock.
    owner: str
    acquired: bool
    #: The credential's record, read right after the lock was taken (None: no record).
    record: bytes | None = None
    #: Set once a commit has let go of the lock in its own script, or chose to keep it.
    released: bool = False
    #: Seconds until the slot reserved at Miro's token endpoint; negative when none was free
    #: soon enough; None when none was asked for.
    slot: float | None = None
    #: The rate limit the slot is from.
    slot_from: TokenRateLimit | None = None
    #: Set once the caller has waited for its slot to call Miro; an unspent slot is given back
    #: with the lock.
    slot_spent: bool = False

    @property
    def holds_unspent_slot(self) -> bool:
        return self.slot is not None and self.slot >= 0 and not self.slot_spent

    def keep(self) -> None:
        """Leave the lock to its TTL: the pair it guards is not in Redis yet (see journal.py)."""
        self.released = True

    def wait_for_slot(self) -> None:
        """Sleep until the slot reserved with the lock falls due; from then on it is spent.

        Raises:
            RateLimited: no slot was free within the limit's ``max_wait``.
            RuntimeError: the lock was taken without asking for a slot.
        """
        if self.slot_from is None or self.slot is None:
            raise RuntimeError(f"the lock of {self.credential_id} was taken without a slot")
        self.slot_from.wait_for(self.slot)
        self.slot_spent = True

    @classmethod
    def held(cls, credential_id: str, owner: str) -> Flight:
        """A lock taken earlier, perhaps by another process, and known by its owner token."""
        return cls(credential_id, owner, acquired=True)

    @property
    def key(self) -> str:
        return lock_key(self.credential_id)


@contextmanager
def single_flight(
    redis: Redis,
    credential_id: str,
    ttl: float,
    wait: float,
    slot_from: TokenRateLimit | None = None,
) -> Iterator[Flight]:
    """Hold the credential's refresh lock, if it can be taken within ``wait`` seconds.

    Args:
        redis: the store's Redis.
        credential_id: whose lock.
        ttl: seconds the lock lives unless let go of.
        wait: seconds to keep trying while another owner holds it; 0 tries once.
        slot_from: a rate limit to reserve a slot from along with the lock, for a caller
            that is going to call Miro's token endpoint.
    """
    flight = _take(redis, credential_id, ttl, wait, slot_from)
    try:
        yield flight
    finally:
        if flight.acquired and not flight.released:
            _release(redis, flight)


def _take(
    redis: Redis, credential_id: str, ttl: float, wait: float, slot_from: TokenRateLimit | None
) -> Flight:
    take, _ = _lock_scripts(redis)
    owner = secrets.token_hex(16)
    keys = [lock_key(credential_id), credential_key(credential_id)]
    args: list[str | float] = [owner, int(ttl * 1000)]
    if slot_from is not None:
        keys.append(slot_from.key)
        args += slot_from.script_args()
    deadline = time.monotonic() + wait
    while True:
        taken = take(keys=keys, args=args)
        if taken[0]:
            slot = float(taken[2]) if slot_from is not None else None
            record = taken[1]
            return Flight(credential_id, owner, True, record, slot=slot, slot_from=slot_from)
        if time.monotonic() >= deadline:
            return Flight(credential_id, owner, acquired=False)
        time.sleep(POLL_INTERVAL)


def _release(redis: Redis, flight: Flight) -> None:
    _, release = _lock_scripts(redis)
    keys, args = [flight.key], [flight.owner]
    if flight.slot_from is not None and flight.holds_unspent_slot:
        keys.append(flight.slot_from.key)
        args.append(flight.slot_from.slot_length())
    try:
        if not release(keys=keys, args=args):
            log.warning("refresh lock of %s had expired before its release", flight.credential_id)
    except RedisError as error:
        log.warning(
            "cannot release the lock of %s (%s); it expires",
            flight.credential_id,
            redis_errors.describe(error),
        )
