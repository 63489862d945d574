"""The id index: which credentials exist, by team and by user, for the console.

The console pages through a million credentials and finds one by its team or user id at a
cost that grows with the page, never with the store (a SCAN of the records grows with the
store). Kept by the scripts that create and delete records, in the same atomic step
(``id_index.lua``); a rotation changes no id and does not touch it. Its parts:

- a set per team of its users' ids: Miro's ids are numbers, so Redis keeps a team's users
  as an intset, a few bytes each, however large the team (up to 512 of them);
- the users in ``USER_BUCKETS`` sorted sets of ``<user_id>:<team_id>``, picked by a hash
  of the user id: each holds a few dozen members at a million credentials, small enough for
  Redis's compact encoding, and a user's teams are one range of one of them. Read bucket
  after bucket they list every credential once;
- a bitmap of the buckets in use, so that list skips the empty ones of a small store.

A store written by a version before the index is indexed by :func:`reindex`
(``python -m worker reindex``), which resumes where it stopped; until then :func:`is_complete`
says no, and the console says that search and the full list may miss credentials.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import NamedTuple

from redis import Redis

from worker import replies, scripts
from worker.constants import (
    CREDENTIAL_KEY_PATTERN,
    CREDENTIAL_KEY_PREFIX,
    ID_BUCKETS_USED,
    ID_INDEX_COMPLETE,
    ID_REINDEX_CURSOR,
    STATE_COUNTS,
    credential_key,
    team_ids_key,
    user_bucket_key,
)
from worker.credential import CredentialId

#: How many buckets the users are spread over: up to about 7 million credentials, a bucket
#: stays under Redis's default of 128 members for a compact sorted set.
USER_BUCKETS = 1 << 16
#: Records read by one SCAN step of :func:`reindex`, and indexed by one script call.
REINDEX_BATCH = 1000


class IdKeys(NamedTuple):
    """Where one credential is indexed."""

    team_set: str
    user_bucket: str
    bucket: int

    @classmethod
    def of(cls, credential_id: CredentialId) -> IdKeys:
        bucket = user_bucket(credential_id.user_id)
        return cls(team_ids_key(credential_id.team_id), user_bucket_key(bucket), bucket)


def user_bucket(user_id: str) -> int:
    """The bucket of a user id: the same in every process (CRC-32, not Python's hash)."""
    return zlib.crc32(user_id.encode()) % USER_BUCKETS


def is_complete(redis: Redis) -> bool:
    """Whether the index holds every stored credential: marked so, or nothing is stored."""
    return bool(redis.exists(ID_INDEX_COMPLETE)) or stored_count(redis) == 0


def stored_count(redis: Redis) -> int:
    """How many credentials are stored, from the counts by state the write scripts keep."""
    return sum(int(count) for count in redis.hvals(STATE_COUNTS))


def reindex(redis: Redis, on_progress: Callable[[int], object] = lambda _: None) -> int:
    """Put every stored record into the index and mark it complete; resumable.

    Walks the records with SCAN from where the last run stopped (its cursor is kept in
    Redis), each batch indexed in one script call that skips the ids deleted meanwhile.
    Records created meanwhile index themselves. Run it once every process runs a version
    that keeps the index: one that does not would create records the index never hears of.

    Returns:
        How many records this run indexed.
    """
    add = redis.register_script(scripts.source("index_ids"))
    cursor = int(redis.get(ID_REINDEX_CURSOR) or 0)
    indexed = 0
    while True:
        cursor, keys = redis.scan(cursor, match=CREDENTIAL_KEY_PATTERN, count=REINDEX_BATCH)
        prefix = len(CREDENTIAL_KEY_PREFIX)
        ids = [CredentialId.parse(key[prefix:]) for key in replies.texts(keys)]
        if ids:
            index_keys, args = _index_call(ids)
            added = int(add(keys=index_keys, args=args))
            indexed += added
            on_progress(added)
        if cursor == 0:
            break
        redis.set(ID_REINDEX_CURSOR, cursor)
    with redis.pipeline(transaction=True) as pipe:
        pipe.set(ID_INDEX_COMPLETE, "1")
        pipe.delete(ID_REINDEX_CURSOR)
        pipe.execute()
    return indexed


def _index_call(ids: Iterable[CredentialId]) -> tuple[list[str], list[str | int]]:
    """The keys and arguments of ``index_ids.lua`` for these ids."""
    keys: list[str] = [ID_BUCKETS_USED]
    args: list[str | int] = []
    for credential_id in ids:
        where = IdKeys.of(credential_id)
        keys += (credential_key(str(credential_id)), where.team_set, where.user_bucket)
        args += (str(credential_id), where.bucket)
    return keys, args
