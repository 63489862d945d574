"""The credential store over a real Redis: compare-and-swap writes and the due index."""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import replace

import pytest
import redis
from cryptography.fernet import Fernet

from worker import redis_errors
from worker.constants import (
    DUE_INDEX,
    FAILING,
    ID_BUCKETS_USED,
    ID_INDEX_COMPLETE,
    STATE_COUNTS,
    answer_key,
    credential_key,
)
from worker.credential import Credential, CredentialId, State
from worker.crypto import TokenCipher
from worker.record import RawRecord, encode
from worker.secret import Secret
from worker.store import ABSENT, CORRUPT, CredentialStore, NotFoundError, Swap, Write

ALICE = CredentialId("1", "100")
#: The id index's keys the write script takes after the lock and the answer key.
ID_INDEX_KEYS = [ID_BUCKETS_USED, ID_INDEX_COMPLETE]


@pytest.fixture
def store(redis_client: redis.Redis) -> CredentialStore:
    return CredentialStore(redis_client, TokenCipher.from_text(Fernet.generate_key().decode()))


def _credential(credential_id: CredentialId = ALICE, **changes: object) -> Credential:
    fields: dict[str, object] = {
        "id": credential_id,
        "access_token": Secret(secrets.token_urlsafe(30)),
        "refresh_token": Secret(secrets.token_urlsafe(30)),
        "access_expires_at": 1_700_003_599,
        "refresh_expires_at": 1_705_184_000,
    }
    fields.update(changes)
    return Credential(**fields)  # type: ignore[arg-type]


def put_one(store: CredentialStore, credential: Credential, due: float | None) -> Credential:
    """Store one grant as the vault does: past whatever is stored."""
    [stored] = store.put_many([(credential, due)])
    return stored.credential


def test_put_stores_version_1_then_bumps_and_replaces(store: CredentialStore) -> None:
    first = put_one(store, _credential(version=50), due=None)
    assert first.version == 1
    assert store.load(ALICE) == first

    second = put_one(store, _credential(), due=None)

    assert second.version == 2
    assert store.load(ALICE) == second
    assert store.load(ALICE).access_token != first.access_token


def test_load_of_an_unknown_id_is_not_found(store: CredentialStore) -> None:
    with pytest.raises(NotFoundError, match="no credential 1:100"):
        store.load(ALICE)


def test_save_succeeds_only_on_the_expected_version(store: CredentialStore) -> None:
    stored = put_one(store, _credential(), due=None)
    rotated = replace(stored, access_token=Secret("new"), version=2)

    assert not store.save(rotated, expected_version=5, due=None)
    assert store.load(ALICE) == stored
    assert store.save(rotated, expected_version=1, due=None)
    assert store.load(ALICE) == rotated
    assert not store.save(replace(rotated, version=3), expected_version=1, due=None)
    assert store.load(ALICE).version == 2


def test_a_write_retried_after_its_reply_was_lost_counts_as_written(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    stored = put_one(store, _credential(), due=None)
    rotated = encode(replace(stored, access_token=Secret("new"), version=2), store.cipher)
    assert store.write(ALICE, "1", rotated, due=None)
    counts = redis_client.hgetall(STATE_COUNTS)

    assert store.write(ALICE, "1", rotated, due=None)  # its own bytes: landed before
    assert redis_client.hgetall(STATE_COUNTS) == counts  # and not counted twice
    other = encode(replace(stored, access_token=Secret("other"), version=2), store.cipher)
    assert not store.write(ALICE, "1", other, due=None)  # another write on version 1 is late
    assert store.raw(ALICE) == rotated


def test_a_call_sent_again_gets_its_first_answer_whatever_was_written_since(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    bob = CredentialId("1", "101")
    put_one(store, _credential(bob), due=None)
    key = answer_key("a-call")
    writes = [
        Write(ALICE, ABSENT, encode(_credential(), store.cipher), None),
        Write(bob, ABSENT, encode(_credential(bob), store.cipher), None),
    ]
    answer = [Swap(found=None), Swap(found="1")]
    assert store._compare_and_swap(writes, answer_key=key) == answer
    rotated = encode(_credential(version=2), store.cipher)
    assert store.write(ALICE, "1", rotated, due=None)  # a worker rotates what the call stored

    assert store._compare_and_swap(writes, answer_key=key) == answer  # not refused this time
    assert store.raw(ALICE) == rotated
    assert 0 < redis_client.pttl(key) <= 300_000


def test_an_answer_is_kept_only_for_a_call_that_lets_go_of_no_lock(
    store: CredentialStore,
) -> None:
    keys = [DUE_INDEX, STATE_COUNTS, FAILING, "lock", answer_key("a-call"), *ID_INDEX_KEYS]
    with pytest.raises(redis.ResponseError, match="only for a call that lets go of no lock"):
        store._write_if_version(keys=keys, args=[1, "owner"])


def test_write_with_absent_only_creates(store: CredentialStore) -> None:
    data = encode(_credential(), store.cipher)
    assert store.write(ALICE, ABSENT, data, None)
    assert store.raw(ALICE) == data
    assert not store.write(ALICE, ABSENT, encode(_credential(), store.cipher), None)
    assert store.raw(ALICE) == data


def test_write_with_corrupt_replaces_only_an_unreadable_record(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    data = encode(_credential(), store.cipher)
    assert not store.write(ALICE, CORRUPT, data, None)  # nothing there
    redis_client.set(credential_key(str(ALICE)), b"garbage without a header")
    assert store.write(ALICE, CORRUPT, data, None)
    assert store.raw(ALICE) == data


def test_put_replaces_a_corrupt_record(store: CredentialStore, redis_client: redis.Redis) -> None:
    redis_client.set(credential_key(str(ALICE)), b"\x00\x01 not a record")
    stored = put_one(store, _credential(), due=None)
    assert store.load(ALICE) == stored


def test_put_replaces_a_record_of_another_schema(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    key = credential_key(str(ALICE))
    redis_client.set(key, b'{"s":9,"v":3,"st":"active"}\n\x80ciphertext')
    result: list[Credential] = []
    worker = threading.Thread(target=lambda: result.append(put_one(store, _credential(), None)))
    worker.start()
    worker.join(timeout=0.5)
    finished = not worker.is_alive()
    redis_client.delete(key)  # lets a spinning put_many write and end
    worker.join(timeout=5)
    assert finished and result and result[0].version == 4  # past the stored one


def test_the_due_index_follows_every_write(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    stored = put_one(store, _credential(), due=1_700_000_100.5)
    assert redis_client.zscore(DUE_INDEX, str(ALICE)) == 1_700_000_100.5

    assert store.save(replace(stored, version=2), 1, due=1_700_000_200)
    assert store.due_at(ALICE) == 1_700_000_200

    assert not store.save(replace(stored, version=3), 1, due=42)  # a failed CAS moves nothing
    assert store.due_at(ALICE) == 1_700_000_200

    assert store.save(replace(stored, version=3), 2, due=None)
    assert redis_client.zscore(DUE_INDEX, str(ALICE)) is None
    assert redis_client.zcard(DUE_INDEX) == 0


def test_schedule_moves_only_the_due_index(store: CredentialStore) -> None:
    put_one(store, _credential(), due=10)
    data = store.raw(ALICE)
    store.schedule(ALICE, 20)
    assert store.due_at(ALICE) == 20
    assert store.raw(ALICE) == data


def test_delete_removes_the_record_and_its_schedule(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    put_one(store, _credential(), due=10)
    assert store.delete(ALICE)
    assert store.raw(ALICE) is None
    assert redis_client.zscore(DUE_INDEX, str(ALICE)) is None
    assert not store.delete(ALICE)


def test_ids_lists_every_credential_or_one_teams(store: CredentialStore) -> None:
    ids = [CredentialId("1", "100"), CredentialId("1", "101"), CredentialId("12", "100")]
    for credential_id in ids:
        put_one(store, _credential(credential_id), due=None)

    assert sorted(store.ids()) == sorted(ids)
    assert sorted(store.ids("1")) == ids[:2]
    assert list(store.ids("12")) == [ids[2]]
    assert list(store.ids("2")) == []


def test_replace_if_equal_swaps_only_the_bytes_that_were_read(store: CredentialStore) -> None:
    put_one(store, _credential(), due=None)
    old = store.raw(ALICE)
    assert old is not None
    new = RawRecord.parse(old).with_header(failure_count=3)

    assert not store.replace_if_equal(ALICE, old + b"x", new)
    assert store.raw(ALICE) == old
    assert store.replace_if_equal(ALICE, old, new)
    assert store.raw(ALICE) == new
    assert not store.replace_if_equal(ALICE, old, old)  # a second swap sees other bytes
    assert not store.replace_if_equal(CredentialId("9", "9"), old, new)
    assert store.raw(CredentialId("9", "9")) is None


def _schema_1_record(credential: Credential, store: CredentialStore) -> bytes:
    """A record as the schema-1 encoder wrote it: every header field, tokens as JSON."""
    assert credential.refresh_token is not None
    header = (
        f'{{"s":1,"v":{credential.version},"st":"{credential.state}","ae":'
        f'{credential.access_expires_at},"re":{credential.refresh_expires_at},"sc":"",'
        f'"tt":"bearer","ca":0,"fc":2}}'
    )
    tokens = {"a": credential.access_token.reveal(), "r": credential.refresh_token.reveal()}
    return header.encode() + b"\n" + store.cipher.encrypt(json.dumps(tokens).encode())


def test_a_schema_1_record_is_compared_swapped_and_deleted_by_the_scripts(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    old = _credential(version=3, state=State.NEEDS_REAUTH, failure_count=2)

    def plant() -> None:
        """The schema-1 record, counted as the scripts counted it when they wrote it."""
        redis_client.flushall()
        redis_client.set(credential_key(str(ALICE)), _schema_1_record(old, store))
        redis_client.hset(STATE_COUNTS, "needs_reauth", 1)
        redis_client.zadd(FAILING, {str(ALICE): 1})

    plant()
    assert store.load(ALICE) == old
    assert not store.save(replace(old, version=4, failure_count=3), 2, due=None)
    assert store.save(replace(old, version=4, state=State.ACTIVE, failure_count=0), 3, due=7)
    assert store.load(ALICE).state is State.ACTIVE and store.due_at(ALICE) == 7
    assert RawRecord.parse(store.raw(ALICE) or b"").schema == 2  # a new write: schema 2
    assert redis_client.hgetall(STATE_COUNTS) == {b"needs_reauth": b"0", b"active": b"1"}
    assert redis_client.zcard(FAILING) == 0

    plant()
    assert put_one(store, _credential(), due=None).version == 4  # bumped past the schema-1 one

    plant()
    assert store.delete(ALICE)
    assert redis_client.hgetall(STATE_COUNTS) == {b"needs_reauth": b"0"}
    assert redis_client.zcard(FAILING) == 0


def _store_contents(store: CredentialStore, redis_client: redis.Redis) -> dict[str, object]:
    """What a write maintains: decrypted records, the due index, counts, failing members."""
    return {
        "records": {str(cid): store.load(cid) for cid in store.ids()},
        "due": redis_client.zrange(DUE_INDEX, 0, -1, withscores=True),
        "counts": redis_client.hgetall(STATE_COUNTS),
        "failing": sorted(redis_client.zrange(FAILING, 0, -1)),
    }


def test_put_many_stores_what_put_one_by_one_stores(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    bob, carol, dave = CredentialId("1", "101"), CredentialId("1", "102"), CredentialId("2", "7")
    existing = [
        _credential(ALICE),
        _credential(bob, state=State.NEEDS_REAUTH, last_error="refused", failure_count=1),
    ]
    entries: list[tuple[Credential, float | None]] = [
        (_credential(ALICE), 100.0),
        (_credential(bob), 200.5),
        (_credential(carol), None),
        (_credential(dave, refresh_token=None, access_expires_at=None), None),
        (_credential(ALICE, scope="again"), 300.0),  # a repeat: compared to the first
        (_credential(CredentialId("3", "9")), 400.0),
        (_credential(CredentialId("3", "9"), scope="again"), 500.0),  # a new user's repeat
    ]

    def seed() -> None:
        redis_client.flushall()
        for credential in existing:
            put_one(store, credential, due=50.0)
        redis_client.set(credential_key(str(carol)), b"corrupt, no header")

    seed()
    one_by_one = [put_one(store, credential, due) for credential, due in entries]
    expected = _store_contents(store, redis_client)
    seed()
    puts = store.put_many(entries)

    assert [put.credential for put in puts] == one_by_one
    assert [put.replaced for put in puts] == [
        State.ACTIVE,
        State.NEEDS_REAUTH,
        None,
        None,
        State.ACTIVE,
        None,
        State.ACTIVE,
    ]
    assert _store_contents(store, redis_client) == expected
    assert [c.version for c in one_by_one] == [2, 2, 1, 1, 3, 1, 2]


def test_a_mark_made_between_a_refused_write_and_its_retry_is_the_state_it_replaced(
    store: CredentialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_one(store, _credential(), due=None)
    marked = RawRecord.parse(store.raw(ALICE) or b"").with_header(state=State.NEEDS_REAUTH)
    swap = store._compare_and_swap
    tries: list[list[str]] = []

    def refused_then_marked_elsewhere(writes: list[Write], **options: str) -> list[Swap]:
        swaps = swap(writes, **options)
        tries.append([write.expected for write in writes])
        if len(tries) == 1:
            # Another host's refusal marks it: the header changes, the version does not.
            [marking] = swap([Write(ALICE, "1", marked, None)])
            assert marking.found is None
        return swaps

    monkeypatch.setattr(store, "_compare_and_swap", refused_then_marked_elsewhere)
    [put] = store.put_many([(_credential(), None)])

    assert tries == [[ABSENT], ["1"]]  # tried as a new user, then past the version named
    assert put.credential.version == 2
    assert put.replaced is State.NEEDS_REAUTH  # what the write replaced, not what was found


def test_a_batch_of_new_users_costs_one_script_call_and_no_read(
    store: CredentialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[object, ...]] = []
    execute = store.redis.execute_command

    def counted(*args: object, **options: object) -> object:
        sent.append(args)
        return execute(*args, **options)

    monkeypatch.setattr(store.redis, "execute_command", counted)
    users = [CredentialId("1", str(user)) for user in range(50)]
    store.put_many([(_credential(user), None) for user in users])

    assert [args[0] for args in sent] == ["EVALSHA"]
    assert [store.load(user).version for user in users] == [1] * 50


def _script_calls(store: CredentialStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many writes each script call of ``store`` holds, from now on."""
    swap = store._compare_and_swap
    calls: list[int] = []

    def counted(writes: list[Write], **options: str) -> list[Swap]:
        calls.append(len(writes))
        return swap(writes, **options)

    monkeypatch.setattr(store, "_compare_and_swap", counted)
    return calls


def test_a_batch_read_first_is_written_past_the_stored_versions_in_one_call(
    store: CredentialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = [CredentialId("1", str(user)) for user in range(50)]
    store.put_many([(_credential(user), None) for user in users[:40]])
    calls = _script_calls(store, monkeypatch)

    puts = store.put_many([(_credential(user), None) for user in users], read_first=True)

    assert calls == [50]
    assert [put.credential.version for put in puts] == [2] * 40 + [1] * 10
    assert [put.replaced for put in puts] == [State.ACTIVE] * 40 + [None] * 10


def test_a_batch_skipping_the_stored_users_costs_one_call_and_leaves_them_as_they_are(
    store: CredentialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = [CredentialId("1", str(user)) for user in range(50)]
    store.put_many([(_credential(user), None) for user in users[:40]])
    before = [store.raw(user) for user in users[:40]]
    calls = _script_calls(store, monkeypatch)

    repeats = [users[0]] * 3  # skipped with the first: no call of their own
    entries = [(_credential(user), None) for user in users + repeats]
    ours: dict[CredentialId, str] = {}
    puts = store.put_many(entries, skip_stored=ours)

    assert calls == [50]
    assert [put is None for put in puts] == [True] * 40 + [False] * 10 + [True] * 3
    assert [store.raw(user) for user in users[:40]] == before
    assert ours == {user: "1" for user in users[40:]}  # the import's account, for its next call


def test_a_repeated_id_is_sent_only_after_the_entry_before_it_is_stored(
    store: CredentialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    swap = store._compare_and_swap
    sent: list[list[str]] = []

    def counted(writes: list[Write], **options: str) -> list[Swap]:
        sent.append([str(write.credential_id) for write in writes])
        return swap(writes, **options)

    monkeypatch.setattr(store, "_compare_and_swap", counted)
    bob = CredentialId("1", "101")
    puts = store.put_many([(_credential(), None)] * 3 + [(_credential(bob), None)])

    assert sent == [["1:100", "1:101"], ["1:100"], ["1:100"]]
    assert [put.credential.version for put in puts] == [1, 2, 3, 1]


def test_a_re_import_costs_a_second_call_and_no_second_encryption(
    store: CredentialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = [CredentialId("1", str(user)) for user in range(50)]
    store.put_many([(_credential(user), None) for user in users])
    encrypt = store.cipher.encrypt
    encrypted: list[bytes] = []
    monkeypatch.setattr(
        store.cipher, "encrypt", lambda plain: encrypted.append(plain) or encrypt(plain)
    )
    calls = _script_calls(store, monkeypatch)

    again = [_credential(user) for user in users]
    puts = store.put_many([(credential, None) for credential in again])

    assert calls == [50, 50]
    assert len(encrypted) == 50
    assert [store.load(user) for user in users] == [put.credential for put in puts]
    assert {put.credential.version for put in puts} == {2}
    assert [store.load(user).access_token for user in users] == [c.access_token for c in again]


@pytest.mark.parametrize("state", ["frozen", None, {}])
def test_a_record_in_a_state_this_version_cannot_read_is_replaced_as_unreadable(
    store: CredentialStore, redis_client: redis.Redis, state: object
) -> None:
    header = json.dumps({"s": 2, "v": 3, "st": state}).encode()
    redis_client.set(credential_key(str(ALICE)), header + b"\n\x80cipher")
    [put] = store.put_many([(_credential(), None)])
    assert put == (store.load(ALICE), None)
    assert put.credential.version == 4


def test_a_batch_with_an_unreadable_new_record_writes_nothing(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    good = Write(ALICE, ABSENT, encode(_credential(), store.cipher), None)
    bad = Write(CredentialId("1", "101"), ABSENT, b"no header", None)
    with pytest.raises(redis.ResponseError, match="new record 2 has no readable header"):
        store._compare_and_swap([good, bad])
    assert redis_client.dbsize() == 0


def test_a_batch_larger_than_one_index_update_slice_is_indexed_whole(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    entries: list[tuple[Credential, float | None]] = [
        (_credential(CredentialId("9", str(user)), failure_count=user % 2), 1_700_000_000.0 + user)
        for user in range(4_500)
    ]
    store.put_many(entries)

    assert redis_client.zcard(DUE_INDEX) == 4_500
    assert redis_client.zscore(DUE_INDEX, "9:4499") == 1_700_004_499.0
    assert redis_client.zcard(FAILING) == 2_250  # the odd ones have a failure on record
    assert redis_client.hgetall(STATE_COUNTS) == {b"active": b"4500"}


def test_records_written_before_an_error_in_a_batch_keep_their_indexes(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    bob = CredentialId("1", "101")
    redis_client.rpush(credential_key(str(bob)), "not a record")  # a key of another type
    good = Write(ALICE, ABSENT, encode(_credential(), store.cipher), 1_700_000_100.0)
    clash = Write(bob, ABSENT, encode(_credential(bob), store.cipher), 1_700_000_200.0)

    with pytest.raises(redis.ResponseError) as raised:
        store._compare_and_swap([good, clash])
    assert redis_errors.describe(raised.value) == "ResponseError WRONGTYPE"  # as unprotected

    assert store.load(ALICE).version == 1
    assert redis_client.zscore(DUE_INDEX, str(ALICE)) == 1_700_000_100.0
    assert redis_client.zscore(DUE_INDEX, str(bob)) is None
    assert redis_client.hgetall(STATE_COUNTS) == {b"active": b"1"}


def test_one_call_writing_an_id_twice_leaves_what_the_second_write_says(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    marked = _credential(state=State.NEEDS_REAUTH, last_error="refused")
    back = _credential(version=2)
    first = Write(ALICE, ABSENT, encode(marked, store.cipher), 1_700_000_100.0)
    second = Write(ALICE, "1", encode(back, store.cipher), None)

    # The second write replaced what the first one left, within the one call.
    assert store._compare_and_swap([first, second]) == [
        Swap(found=None),
        Swap(found=None, replaced=State.NEEDS_REAUTH),
    ]

    assert store.load(ALICE).version == 2 and store.load(ALICE).state is State.ACTIVE
    assert redis_client.zscore(DUE_INDEX, str(ALICE)) is None
    assert redis_client.zscore(FAILING, str(ALICE)) is None
    assert redis_client.hgetall(STATE_COUNTS) == {b"active": b"1", b"needs_reauth": b"0"}


def test_a_batch_with_a_due_time_that_is_no_number_writes_nothing(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    good = Write(ALICE, ABSENT, encode(_credential(), store.cipher), None)
    bad = Write(CredentialId("1", "101"), ABSENT, good.data, float("nan"))
    with pytest.raises(redis.ResponseError, match="due time of record 2 is not a number"):
        store._compare_and_swap([good, bad])
    assert redis_client.dbsize() == 0


def test_the_write_script_with_no_record_only_lets_go_of_the_lock(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    redis_client.set("lock", "owner")
    keys = [DUE_INDEX, STATE_COUNTS, FAILING, "lock", "", *ID_INDEX_KEYS]
    assert store._write_if_version(keys=keys, args=[1, "owner"]) == [1]
    assert store._write_if_version(keys=keys, args=[1, "owner"]) == [0]  # gone already
    assert redis_client.get("lock") is None
