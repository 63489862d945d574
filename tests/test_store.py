"""The credential store over a real Redis: compare-and-swap writes and the due index."""

from __future__ import annotations

import secrets
import threading
from dataclasses import replace

import pytest
import redis
from cryptography.fernet import Fernet

from worker.constants import DUE_INDEX, credential_key
from worker.credential import Credential, CredentialId
from worker.crypto import TokenCipher
from worker.record import RawRecord, encode
from worker.secret import Secret
from worker.store import ABSENT, CORRUPT, CredentialStore, NotFoundError

ALICE = CredentialId("1", "100")


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


def test_put_stores_version_1_then_bumps_and_replaces(store: CredentialStore) -> None:
    first = store.put(_credential(version=50), due=None)
    assert first.version == 1
    assert store.load(ALICE) == first

    second = store.put(_credential(), due=None)

    assert second.version == 2
    assert store.load(ALICE) == second
    assert store.load(ALICE).access_token != first.access_token


def test_load_of_an_unknown_id_is_not_found(store: CredentialStore) -> None:
    with pytest.raises(NotFoundError, match="no credential 1:100"):
        store.load(ALICE)


def test_save_succeeds_only_on_the_expected_version(store: CredentialStore) -> None:
    stored = store.put(_credential(), due=None)
    rotated = replace(stored, access_token=Secret("new"), version=2)

    assert not store.save(rotated, expected_version=5, due=None)
    assert store.load(ALICE) == stored
    assert store.save(rotated, expected_version=1, due=None)
    assert store.load(ALICE) == rotated
    assert not store.save(replace(rotated, version=3), expected_version=1, due=None)
    assert store.load(ALICE).version == 2


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
    stored = store.put(_credential(), due=None)
    assert store.load(ALICE) == stored


def test_put_replaces_a_record_of_another_schema(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    key = credential_key(str(ALICE))
    redis_client.set(key, b'{"s":2,"v":3,"st":"active"}\n\x80ciphertext')
    result: list[Credential] = []
    worker = threading.Thread(target=lambda: result.append(store.put(_credential(), None)))
    worker.start()
    worker.join(timeout=0.5)
    finished = not worker.is_alive()
    redis_client.delete(key)  # lets a spinning put() write and end
    worker.join(timeout=5)
    assert finished and result and result[0].version == 4  # past the stored one


def test_the_due_index_follows_every_write(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    stored = store.put(_credential(), due=1_700_000_100.5)
    assert redis_client.zscore(DUE_INDEX, str(ALICE)) == 1_700_000_100.5

    assert store.save(replace(stored, version=2), 1, due=1_700_000_200)
    assert store.due_at(ALICE) == 1_700_000_200

    assert not store.save(replace(stored, version=3), 1, due=42)  # a failed CAS moves nothing
    assert store.due_at(ALICE) == 1_700_000_200

    assert store.save(replace(stored, version=3), 2, due=None)
    assert redis_client.zscore(DUE_INDEX, str(ALICE)) is None
    assert redis_client.zcard(DUE_INDEX) == 0


def test_schedule_moves_only_the_due_index(store: CredentialStore) -> None:
    store.put(_credential(), due=10)
    data = store.raw(ALICE)
    store.schedule(ALICE, 20)
    assert store.due_at(ALICE) == 20
    assert store.raw(ALICE) == data


def test_delete_removes_the_record_and_its_schedule(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    store.put(_credential(), due=10)
    assert store.delete(ALICE)
    assert store.raw(ALICE) is None
    assert redis_client.zscore(DUE_INDEX, str(ALICE)) is None
    assert not store.delete(ALICE)


def test_ids_lists_every_credential_or_one_teams(store: CredentialStore) -> None:
    ids = [CredentialId("1", "100"), CredentialId("1", "101"), CredentialId("12", "100")]
    for credential_id in ids:
        store.put(_credential(credential_id), due=None)

    assert sorted(store.ids()) == sorted(ids)
    assert sorted(store.ids("1")) == ids[:2]
    assert list(store.ids("12")) == [ids[2]]
    assert list(store.ids("2")) == []


def test_replace_if_equal_swaps_only_the_bytes_that_were_read(store: CredentialStore) -> None:
    store.put(_credential(), due=None)
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
