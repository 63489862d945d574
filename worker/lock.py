"""Single flight: one refresh of a credential at a time, across threads, processes and hosts.

A refresh token is single-use, so two refreshes of one credential at once would kill it.
The lock is redis-py's owner-token lock (only its owner can release it, by a Lua
compare-and-delete); its TTL outlives the HTTP timeout plus the commit retries, so it cannot
expire under a rotation that is still going to write.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError

from worker.constants import lock_key

log = logging.getLogger(__name__)

#: How often a waiting caller polls the lock; short, so forced rotations queue tightly.
POLL_INTERVAL = 0.01


@contextmanager
def single_flight(redis: Redis, credential_id: str, ttl: float, wait: float) -> Iterator[bool]:
    """Hold the credential's refresh lock; yields whether it was acquired within ``wait``."""
    lock = redis.lock(
        lock_key(credential_id),
        timeout=ttl,
        sleep=POLL_INTERVAL,
        blocking_timeout=wait,
        thread_local=False,
    )
    acquired = lock.acquire(blocking=wait > 0)
    try:
        yield acquired
    finally:
        if acquired:
            _release(lock, credential_id)


def _release(lock: object, credential_id: str) -> None:
    try:
        lock.release()  # type: ignore[attr-defined]
    except LockError:
        log.warning("refresh lock of %s had expired before its release", credential_id)
    except RedisConnectionError:
        log.warning("cannot release the lock of %s: Redis is down; it expires", credential_id)
