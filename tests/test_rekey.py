"""Key rotation: every record re-encrypted under the new key, while rotations go on."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet

from settings import Settings
from tests.conftest import run_cli
from worker.constants import credential_key
from worker.credential import CredentialId
from worker.record import RawRecord
from worker.rekey import rekey_all, rekey_one
from worker.sandbox import Sandbox
from worker.secret import Secret
from worker.vault import Vault


@pytest.fixture
def rekeyed_env(env: dict[str, str], encryption_key: str) -> dict[str, str]:
    """The same service with a new key put first, the old one kept after it."""
    return {**env, "TOKEN_ENCRYPTION_KEYS": f"{Fernet.generate_key().decode()},{encryption_key}"}


def _under_first_key(vault: Vault, credential_id: CredentialId) -> bool:
    data = vault.store.raw(credential_id)
    assert data is not None
    return vault.store.cipher.is_primary(RawRecord.parse(data).ciphertext)


def test_rekey_moves_every_record_to_the_first_key_and_is_resumable(
    sandbox: Sandbox, vault: Vault, rekeyed_env: dict[str, str]
) -> None:
    ids = [vault.import_response(r).id for r in sandbox.create_grants(20)]
    rekeyed = Vault.from_settings(Settings.from_env(rekeyed_env))
    assert not any(_under_first_key(rekeyed, cid) for cid in ids)

    first = rekey_all(rekeyed.store, ids[:8])  # interrupted after 8
    again = rekey_all(rekeyed.store, ids)

    assert (first.reencrypted, again.reencrypted, again.already_current) == (8, 12, 8)
    assert again.old_keys_removable
    assert all(_under_first_key(rekeyed, cid) for cid in ids)
    new_key_only = Settings.from_env(
        {**rekeyed_env, "TOKEN_ENCRYPTION_KEYS": rekeyed_env["TOKEN_ENCRYPTION_KEYS"].split(",")[0]}
    )
    for credential_id in ids:  # readable without the old key: it can go
        Vault.from_settings(new_key_only).store.load(credential_id)


def test_rekey_never_overwrites_a_rotation_that_lands_meanwhile(
    sandbox: Sandbox, vault: Vault, rekeyed_env: dict[str, str]
) -> None:
    credential = vault.import_response(sandbox.create_grants(1)[0])
    rekeyed = Vault.from_settings(Settings.from_env(rekeyed_env))
    stop = threading.Event()
    rotations: list[Any] = []

    def rotate_repeatedly() -> None:
        while not stop.is_set():
            rotations.append(rekeyed.rotate_now(credential.id).outcome)

    rotator = threading.Thread(target=rotate_repeatedly)
    rotator.start()
    rekeys, deadline = 0, time.monotonic() + 30
    try:
        # Until both sides have had their turns many times over, however the threads run.
        while (rekeys < 50 or len(rotations) < 3) and time.monotonic() < deadline:
            rekey_one(rekeyed.store, credential.id)
            rekeys += 1
    finally:
        stop.set()
        rotator.join()

    grant = sandbox.grant(credential.id.team_id, credential.id.user_id)
    assert rekeys >= 50 and len(rotations) >= 3
    assert rekeyed.store.load(credential.id).refresh_token == Secret(grant["refresh_token"])
    assert sandbox.stats()["reused_refresh_tokens"] == 0


def test_rekey_reports_records_no_key_opens(
    sandbox: Sandbox, env: dict[str, str], vault: Vault
) -> None:
    foreign = Vault.from_settings(
        Settings.from_env({**env, "TOKEN_ENCRYPTION_KEYS": Fernet.generate_key().decode()})
    )
    credential = foreign.import_response(sandbox.create_grants(1)[0])
    report = rekey_all(vault.store, [credential.id])
    assert report.undecryptable == 1 and not report.old_keys_removable


def test_rotate_key_command_reports_when_the_old_key_can_go(
    sandbox: Sandbox, vault: Vault, rekeyed_env: dict[str, str]
) -> None:
    for response in sandbox.create_grants(3):
        vault.import_response(response)
    result = run_cli(rekeyed_env, "rotate-key")
    assert result.returncode == 0, result.stderr
    assert "3 re-encrypted" in result.stdout
    assert "old keys can be removed" in result.stdout


def test_a_schema_1_record_is_rekeyed_and_keeps_its_schema(
    sandbox: Sandbox, vault: Vault, rekeyed_env: dict[str, str], redis_client: redis.Redis
) -> None:
    credential = vault.import_response(sandbox.create_grants(1)[0])
    assert credential.refresh_token is not None
    tokens = {"a": credential.access_token.reveal(), "r": credential.refresh_token.reveal()}
    header = RawRecord.parse(vault.store.raw(credential.id) or b"").header
    schema_1 = (
        json.dumps({**header, "s": 1, "tt": "bearer", "lr": credential.last_refresh_at}).encode()
        + b"\n"
        + vault.store.cipher.encrypt(json.dumps(tokens).encode())
    )
    redis_client.set(credential_key(str(credential.id)), schema_1)
    rekeyed = Vault.from_settings(Settings.from_env(rekeyed_env))

    assert rekey_one(rekeyed.store, credential.id) == "reencrypted"

    data = rekeyed.store.raw(credential.id) or b""
    assert RawRecord.parse(data).header == json.loads(schema_1.partition(b"\n")[0])
    assert _under_first_key(rekeyed, credential.id)
    assert rekeyed.store.load(credential.id) == credential
