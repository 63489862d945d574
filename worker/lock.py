"""Single flight: one refresh of a credential at a time, across threads, processes and hosts.

A refresh token is single-use, so two refreshes of one credential at once would kill it.
The lock is a key holding its owner's random token, set only if absent and with a TTL that
outlives the HTTP timeout plus the commit retries, counted from the moment its rate-limit slot
comes due, so it cannot expire under a rotation that is still going to write; only its owner
lets it go (a compare-and-delete).

It is taken by ``scripts/take_lock.lua``, which reads the credential's record in the same
step (and, for a rotation, reserves its slot at Miro's token endpoint and hides the credential
from the scan until the lock runs out), and let go by the commit's own script
(``write_if_version.lua``) or, on every other path, by ``scripts/release_lock.lua``: a
rotation's lock costs no round trip of its own. A task's rotations go further: each takes the
next credential's lock in the round trip that lets go of its own (:func:`call_handing_over`),
so a scheduled rotation costs one round trip, not two.
redis-py's ``Lock`` keeps the same format (its tests take the lock over with it) but cannot
share a round trip with anything else.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

from redis import Redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisError

from worker import redis_errors, scripts
from worker.constants import DUE_INDEX, credential_key, lock_key
from worker.ratelimit import TokenRateLimit

log = logging.getLogger(__name__)

#: How often a waiting caller polls the lock; short, so forced rotations queue tightly.
POLL_INTERVAL = 0.01
#: Seconds a lock taken ahead (with the previous rotation's commit) may wait for its own
#: rotation, which it outlives by its TTL; older, it is let go of and taken anew.
AHEAD_MAX_AGE = 1.0

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
    #: When no slot was handed out because Miro's 429 holds every call back: the hold's end.
    held_until: float | None = None
    #: Set once the caller has waited for its slot to call Miro; an unspent slot is given back
    #: with the lock.
    slot_spent: bool = False
    #: The next credential's take, sent in the round trip that lets go of this lock.
    then: LockRequest | None = None
    #: When the lock was taken (``time.monotonic``).
    taken_at: float = field(default_factory=time.monotonic)

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
        self.slot_from.wait_for(self.slot, self.held_until)
        self.slot_spent = True

    @classmethod
    def held(cls, credential_id: str, owner: str) -> Flight:
        """A lock taken earlier, perhaps by another process, and known by its owner token."""
        return cls(credential_id, owner, acquired=True)

    @property
    def key(self) -> str:
        return lock_key(self.credential_id)


@dataclass
class LockRequest:
    """A take of one credential's lock, made ready before it is sent.

    Its owner token is drawn once: the take can be sent again after a lost reply, or after
    riding along with another flight's release, and still find the lock its own.
    """

    credential_id: str
    #: Seconds the lock lives unless let go of.
    ttl: float
    #: A rate limit to reserve a slot from along with the lock, for a caller that is going to
    #: call Miro's token endpoint: a rotation, whose credential the lock also hides from the
    #: scan.
    slot_from: TokenRateLimit | None = None
    owner: str = field(default_factory=lambda: secrets.token_hex(16))
    #: What the take found when it rode along with another flight's release; None until then.
    taken_ahead: Flight | None = None

    def script_call(self, ahead: bool = False) -> tuple[list[str], list[str | float]]:
        """The keys and arguments of ``take_lock.lua`` for this take (``ahead`` of its use)."""
        ttl = self.ttl + AHEAD_MAX_AGE if ahead else self.ttl
        keys = [lock_key(self.credential_id), credential_key(self.credential_id)]
        args: list[str | float] = [self.owner, int(ttl * 1000)]
        if self.slot_from is not None:
            keys += [DUE_INDEX, self.slot_from.key, self.slot_from.hold_key]
            args += [self.credential_id, repr(time.time()), *self.slot_from.script_args()]
        return keys, args

    def flight(self, reply: Sequence[Any]) -> Flight:
        """The flight a reply of ``take_lock.lua`` stands for."""
        if not reply[0]:
            return Flight(self.credential_id, self.owner, acquired=False)
        flight = Flight(self.credential_id, self.owner, True, reply[1], slot_from=self.slot_from)
        if self.slot_from is not None:
            flight.slot = float(reply[2])
            flight.held_until = float(reply[3]) if len(reply) > 3 else None
        return flight


@contextmanager
def single_flight(
    redis: Redis, request: LockRequest, wait: float, then: LockRequest | None = None
) -> Iterator[Flight]:
    """Hold the credential's refresh lock, if it can be taken within ``wait`` seconds.

    Args:
        redis: the store's Redis.
        request: whose lock, and how. A lock it took ahead is used as it is while younger
            than ``AHEAD_MAX_AGE``; older, it is let go of and taken anew.
        wait: seconds to keep trying while another owner holds it; 0 tries once.
        then: the next credential's take, sent in the round trip that lets go of this lock
            (a task's rotations one after the other); the lock it takes is the caller's to
            use or let go of (:func:`let_go_ahead`), whatever happens in this flight.
    """
    ahead = request.taken_ahead
    if ahead is not None and ahead.acquired and time.monotonic() - ahead.taken_at < AHEAD_MAX_AGE:
        request.taken_ahead = None
        flight = ahead
    else:
        let_go_ahead(redis, request)
        flight = _take(redis, request, wait)
    flight.then = then
    try:
        yield flight
    finally:
        if flight.acquired and not flight.released:
            _release(redis, flight)


def _take(redis: Redis, request: LockRequest, wait: float) -> Flight:
    take, _ = _lock_scripts(redis)
    keys, args = request.script_call()
    deadline = time.monotonic() + wait
    while True:
        flight = request.flight(take(keys=keys, args=args))
        if flight.acquired or time.monotonic() >= deadline:
            return flight
        time.sleep(POLL_INTERVAL)


def call_handing_over(
    redis: Redis, script: Script, keys: Sequence[Any], args: Sequence[Any], flight: Flight | None
) -> Any:
    """``script``'s reply, with the lock ``flight.then`` asks for taken in the same round trip.

    Both go in one pipeline, each its own atomic script: the take cannot fail the first
    call. A take that fails, or never answers, is left to be sent again by its own flight,
    with its owner. Errors come back in place (``raise_on_error=False``), also because
    redis-py would otherwise write the command's arguments, records among them, into the
    error's message.

    Raises:
        RedisError: the first call's own error, or Redis unreachable (neither, one or both
            calls may have run: both scripts are idempotent for a call sent again, bar a
            second rate-limit slot for a take); or that of the first call sent alone, when
            Redis had forgotten its script.
    """
    then = flight.then if flight is not None else None
    if then is None or then.taken_ahead is not None:
        return script(keys=keys, args=args)
    take, _ = _lock_scripts(redis)
    take_keys, take_args = then.script_call(ahead=True)
    # EVALSHA straight, not Script objects: a pipeline of those asks SCRIPT EXISTS first, a
    # round trip of its own.
    sent_at = time.monotonic()  # the lock's TTL runs from before its reply comes
    with redis.pipeline(transaction=False) as pipe:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        pipe.evalsha(take.sha, len(take_keys), *take_keys, *take_args)
        reply, taken = pipe.execute(raise_on_error=False)
    if not isinstance(taken, Exception):
        then.taken_ahead = then.flight(taken)
        then.taken_ahead.taken_at = sent_at
    if isinstance(reply, NoScriptError):  # a restarted Redis forgot it: nothing ran
        return script(keys=keys, args=args)
    if isinstance(reply, Exception):
        raise reply
    return reply


def let_go_ahead(redis: Redis, request: LockRequest) -> None:
    """Let go of a lock taken ahead, with its slot, if it holds one.

    Its rotation is not coming, or must read the record anew: its flight then takes it again.
    """
    flight, request.taken_ahead = request.taken_ahead, None
    if flight is not None and flight.acquired:
        _release(redis, flight)


def _release(redis: Redis, flight: Flight) -> None:
    _, release = _lock_scripts(redis)
    keys, args = [flight.key], [flight.owner]
    if flight.slot_from is not None and flight.holds_unspent_slot:
        keys.append(flight.slot_from.key)
        args.append(flight.slot_from.slot_length())
    try:
        if not call_handing_over(redis, release, keys, args, flight):
            log.warning("refresh lock of %s had expired before its release", flight.credential_id)
    except RedisError as error:
        log.warning(
            "cannot release the lock of %s (%s); it expires",
            flight.credential_id,
            redis_errors.describe(error),
        )
