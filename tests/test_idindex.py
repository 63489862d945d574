"""The id index over a real Redis: kept by the writes that create and delete records, left
alone by rotations, built for an older store by a resumable ``reindex``.
"""

from __future__ import annotations

from itertools import count
from typing import Any

import pytest
import redis

from tests.conftest import run_cli
from worker import scripts
from worker.constants import ID_BUCKETS_USED, ID_INDEX_COMPLETE, ID_REINDEX_CURSOR
from worker.credential import Credential
from worker.idindex import REINDEX_BATCH, _index_call, is_complete, reindex, user_bucket
from worker.listing import Listing
from worker.sandbox import Sandbox
from worker.vault import Vault

TEAM = "3074457358607431473"
OTHER_TEAM = "3074457362198745012"


def _store(sandbox: Sandbox, vault: Vault, team_id: str, user_id: str) -> Credential:
    """Store a grant of this user in this team, as an import of Miro's response would."""
    return vault.import_response({**sandbox.create_grants(1, team_id)[0], "user_id": user_id})


def _found(vault: Vault, query: str) -> list[str]:
    return [row["id"] for row in Listing(vault.store).search(query).rows]


def _bucket_in_use(redis_client: redis.Redis, user_id: str) -> bool:
    return bool(redis_client.getbit(ID_BUCKETS_USED, user_bucket(user_id)))


def _index(redis_client: redis.Redis) -> dict[bytes, Any]:
    """Every key of the index with its content, to see that something left it as it was."""
    found: dict[bytes, Any] = {}
    for key in redis_client.scan_iter("mtk:ids:*"):
        kind = redis_client.type(key)
        if kind == b"set":
            found[key] = redis_client.smembers(key)
        elif kind == b"zset":
            found[key] = redis_client.zrange(key, 0, -1)
        else:
            found[key] = redis_client.get(key)
    return found


def _as_before_the_index(redis_client: redis.Redis) -> None:
    """The store as a version before the index left it: the records, no index."""
    redis_client.delete(*redis_client.scan_iter("mtk:ids:*"))


def _sharing_a_bucket() -> tuple[str, str]:
    """Two user ids whose index entries fall in the same bucket."""
    seen: dict[int, str] = {}
    for number in count(3458764513820540928):
        user_id = str(number)
        bucket = user_bucket(user_id)
        if bucket in seen:
            return seen[bucket], user_id
        seen[bucket] = user_id
    raise AssertionError("unreachable")


def test_a_credential_is_found_by_its_team_by_its_user_and_whole(
    sandbox: Sandbox, vault: Vault
) -> None:
    user = "3458764513820540928"
    first = _store(sandbox, vault, TEAM, user)
    second = _store(sandbox, vault, OTHER_TEAM, user)
    neighbour = _store(sandbox, vault, TEAM, "3458764513820540929")

    assert _found(vault, TEAM) == [str(first.id), str(neighbour.id)]
    assert _found(vault, user) == [str(first.id), str(second.id)]
    assert _found(vault, str(second.id)) == [str(second.id)]
    assert _found(vault, "3458764513820540") == []  # exact ids only, no prefixes


def test_a_deleted_credential_leaves_the_index_and_its_empty_bucket(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    kept = _store(sandbox, vault, TEAM, "3458764513820540928")
    gone = _store(sandbox, vault, TEAM, "3458764513820549999")
    assert user_bucket(kept.id.user_id) != user_bucket(gone.id.user_id)

    assert vault.revoke(gone.id)

    assert _found(vault, TEAM) == [str(kept.id)]
    assert _found(vault, gone.id.user_id) == []
    assert not _bucket_in_use(redis_client, gone.id.user_id)
    assert _bucket_in_use(redis_client, kept.id.user_id)


def test_a_bucket_stays_in_use_while_a_user_is_left_in_it(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    first, second = _sharing_a_bucket()
    _store(sandbox, vault, TEAM, first)
    leaving = _store(sandbox, vault, TEAM, second)

    vault.store.delete(leaving.id)

    assert _bucket_in_use(redis_client, first)
    assert _found(vault, first) == [f"{TEAM}:{first}"]


def test_rotations_and_reconnects_leave_the_index_as_it_was(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    credential = _store(sandbox, vault, TEAM, "3458764513820540928")
    before = _index(redis_client)

    assert vault.rotate_now(credential.id).outcome == "rotated"
    _store(sandbox, vault, TEAM, "3458764513820540928")  # the user connects again

    assert _index(redis_client) == before


def test_a_store_indexed_from_its_first_record_is_complete(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    assert is_complete(redis_client)  # nothing stored: nothing to miss

    vault.import_many(sandbox.create_grants(3, TEAM))

    assert redis_client.exists(ID_INDEX_COMPLETE)
    assert is_complete(redis_client)


def test_records_stored_before_the_index_make_it_incomplete_until_reindexed(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    old = vault.import_many(sandbox.create_grants(3, TEAM))
    _as_before_the_index(redis_client)
    new = _store(sandbox, vault, TEAM, "42")  # a record of this version, after the upgrade

    assert not is_complete(redis_client)
    assert _found(vault, TEAM) == [str(new.id)]

    assert reindex(redis_client) == 4

    assert is_complete(redis_client)
    assert sorted(_found(vault, TEAM)) == sorted(str(c.id) for c in [*old, new])


class _Interrupted(Exception):
    pass


def test_reindex_resumes_where_an_interrupted_run_stopped(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    stored = vault.import_many(sandbox.create_grants(5 * REINDEX_BATCH, TEAM))
    _as_before_the_index(redis_client)
    done: list[int] = []

    def interrupt_after_two_batches(indexed: int) -> None:
        done.append(indexed)
        if len(done) == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        reindex(redis_client, on_progress=interrupt_after_two_batches)
    assert redis_client.get(ID_REINDEX_CURSOR) is not None
    assert not is_complete(redis_client)
    first_run = sum(done)

    second_run = reindex(redis_client)

    assert first_run + second_run < len(stored) + REINDEX_BATCH  # resumed, not started over
    assert is_complete(redis_client) and not redis_client.exists(ID_REINDEX_CURSOR)
    assert redis_client.scard(f"mtk:ids:team:{TEAM}") == len(stored)


def test_a_reindex_batch_brings_back_no_credential_deleted_since_its_scan(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    kept, deleted = vault.import_many(sandbox.create_grants(2, TEAM))
    _as_before_the_index(redis_client)
    vault.store.delete(deleted.id)  # after SCAN named it, before its batch is indexed
    keys, args = _index_call([kept.id, deleted.id])

    indexed = redis_client.register_script(scripts.source("index_ids"))(keys=keys, args=args)

    assert indexed == 1
    assert _found(vault, TEAM) == [str(kept.id)]


def test_the_reindex_command_says_what_it_did(
    env: dict[str, str], sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    vault.import_many(sandbox.create_grants(3, TEAM))
    _as_before_the_index(redis_client)

    result = run_cli(env, "reindex")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3 records indexed; the id index is complete"
    assert is_complete(redis_client)
