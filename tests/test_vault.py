"""The vault end to end: Miro's guide against the sandbox, over real Redis and HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from settings import Settings
from tests.conftest import CLIENT_ID, EVERY_DIALECT, authorize_code, free_port
from worker.credential import CredentialId, State
from worker.miro import Refused, TokenGrant, Transient
from worker.outcomes import Outcome
from worker.redis_server import RedisServer
from worker.sandbox import Sandbox, SandboxConfig
from worker.secret import Secret
from worker.vault import GrantKept, NotRevoked, Vault, VaultError, connect_redis


class Later:
    """Real time plus ``ahead`` seconds: moved on, every access token issued has expired."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


@pytest.fixture
def later() -> Later:
    return Later()


@pytest.fixture
def sandbox(client_secret: str, dialect: Any, later: Later) -> Iterator[Sandbox]:
    """The sandbox, on a clock a test can move on."""
    config = SandboxConfig(CLIENT_ID, client_secret, dialect=dialect, clock=later)
    with Sandbox(config) as running:
        yield running


def _two_hours_later(later: Later, *vaults: Vault) -> None:
    """Every access token has expired, for Miro and for the vaults alike."""
    later.ahead = 7200
    for vault in vaults:
        vault.clock = vault.rotator.clock = later


def test_exchange_refresh_and_token_info_end_to_end(sandbox: Sandbox, vault: Vault) -> None:
    credential = vault.exchange(authorize_code(sandbox, vault, team_id="3074457358607431473"))
    assert str(credential.id).startswith("3074457358607431473:")
    assert credential.state is State.ACTIVE and credential.version == 1
    grant = sandbox.grant(credential.id.team_id, credential.id.user_id)
    assert credential.refresh_token == Secret(grant["refresh_token"])

    result = vault.rotate_now(credential.id)

    assert result.outcome is Outcome.ROTATED and result.version == 2
    stored = vault.store.load(credential.id)
    grant = sandbox.grant(credential.id.team_id, credential.id.user_id)
    assert stored.refresh_token == Secret(grant["refresh_token"])
    assert stored.access_token != credential.access_token
    info = vault.client.token_info(stored.access_token)
    assert info["user"]["id"] == credential.id.user_id
    assert sandbox.stats()["refreshes"] == 1
    assert sandbox.stats()["reused_refresh_tokens"] == 0


def test_refresh_keeps_big_team_id_exact(sandbox: Sandbox, vault: Vault, connect: Any) -> None:
    credential = connect(team_id="9007199254740993")  # 2^53 + 1: a float would round it
    vault.rotate_now(credential.id)
    assert vault.store.load(credential.id).id.team_id == "9007199254740993"


def _all_bytes(client: redis.Redis, data_dir: Any) -> bytes:
    """Every value in Redis and every byte of its files on disk."""
    values = [client.dump(key) or b"" for key in client.scan_iter("*")]
    client.save()
    files = [path.read_bytes() for path in data_dir.rglob("*") if path.is_file()]
    return b"".join(values + files)


def test_a_raw_redis_dump_holds_no_token(
    sandbox: Sandbox, vault: Vault, connect: Any, redis_client: redis.Redis, redis_server: Any
) -> None:
    credential = connect()
    tokens = [credential.access_token.reveal(), credential.refresh_token.reveal()]
    vault.rotate_now(credential.id)
    current = vault.store.load(credential.id)
    tokens += [current.access_token.reveal(), current.refresh_token.reveal()]

    dump = _all_bytes(redis_client, redis_server.data_dir)

    assert len(dump) > 1000
    for token in tokens:
        assert token.encode() not in dump


def test_import_a_response_and_hand_out_its_token(sandbox: Sandbox, vault: Vault) -> None:
    [response] = sandbox.create_grants(1)
    credential = vault.import_response(json.loads(json.dumps(response)))
    token = vault.access_token(credential.id)
    assert token.reveal() == response["access_token"]
    assert sandbox.stats()["refreshes"] == 0


def test_access_token_refreshes_an_expiring_one_first(sandbox: Sandbox, vault: Vault) -> None:
    [response] = sandbox.create_grants(1)
    response["expires_in"] = 30  # inside the minimum validity of a handed-out token
    credential = vault.import_response(response)

    token = vault.access_token(credential.id)

    assert token != credential.access_token
    assert sandbox.stats()["refreshes"] == 1


def test_non_expiring_tokens_are_stored_and_never_scheduled(vault: Vault) -> None:
    credential = vault.import_response(
        {"access_token": "long-lived", "team_id": "1", "user_id": "2", "token_type": "bearer"}
    )
    assert credential.refresh_token is None and not credential.expires
    assert vault.store.due_at(credential.id) is None
    assert vault.rotate_now(credential.id).outcome is Outcome.NOT_EXPIRING
    assert vault.access_token(credential.id).reveal() == "long-lived"


def test_a_reconnect_replaces_the_credential_and_bumps_its_version(
    sandbox: Sandbox, vault: Vault, connect: Any
) -> None:
    first = connect(user_id="42")
    second = connect(user_id="42")
    assert second.id == first.id and second.version == first.version + 1
    assert vault.store.load(first.id).refresh_token == second.refresh_token


@EVERY_DIALECT
def test_rejected_refresh_marks_needs_reauth_and_keeps_the_record(
    sandbox: Sandbox, vault: Vault, connect: Any
) -> None:
    credential = connect()
    changes: list[Any] = []
    vault.listeners.append(changes.append)
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)

    result = vault.rotate_now(credential.id)

    assert result.outcome is Outcome.NEEDS_REAUTH
    stored = vault.store.load(credential.id)
    assert stored.state is State.NEEDS_REAUTH
    assert stored.refresh_token == credential.refresh_token  # kept for the operator
    assert "refused" in (stored.last_error or "")
    assert vault.store.due_at(credential.id) is None
    assert [(c.credential_id, c.new) for c in changes] == [(str(credential.id), State.NEEDS_REAUTH)]
    with pytest.raises(VaultError, match="needs_reauth"):
        vault.access_token(credential.id)


def test_an_exchange_answer_without_ids_is_named_by_token_info(
    sandbox: Sandbox, vault: Vault
) -> None:
    sandbox.set_faults(omit_ids=True)

    credential = vault.exchange(authorize_code(sandbox, vault, team_id="77", user_id="4242"))

    assert credential.id == CredentialId("77", "4242")
    assert vault.store.load(credential.id) == credential
    assert vault.rotate_now(credential.id).outcome is Outcome.ROTATED


def test_a_grant_that_cannot_be_named_yet_is_kept_and_stored_by_the_next_replay(
    sandbox: Sandbox, vault: Vault, env: dict[str, str]
) -> None:
    sandbox.set_faults(omit_ids=True, token_info_fails=True)
    code = authorize_code(sandbox, vault, team_id="77", user_id="4242")

    with pytest.raises(GrantKept, match="it is kept") as kept:
        vault.exchange(code)

    [grant] = sandbox.grants()
    journal = vault.rotator.journal
    assert journal.pending_count() == 1 and list(vault.store.ids()) == []
    written = journal.path.read_bytes() + str(kept.value).encode()
    assert grant["access_token"].encode() not in written  # encrypted, as every record
    assert grant["refresh_token"].encode() not in written
    assert vault.recover().remaining == 1  # Miro still cannot name it: still kept
    sandbox.set_faults(token_info_fails=False)

    report = Vault.from_settings(Settings.from_env(env)).recover()  # the next process

    assert (report.remaining, journal.pending_count()) == (0, 0)
    stored = vault.store.load(CredentialId("77", "4242"))
    assert stored.refresh_token == Secret(grant["refresh_token"])
    assert vault.rotate_now(stored.id).outcome is Outcome.ROTATED


def test_a_grant_redis_did_not_take_is_kept_and_stored_once_redis_is_back(
    sandbox: Sandbox, env: dict[str, str], tmp_path: Any
) -> None:
    server = RedisServer(tmp_path / "redis", free_port()).start()
    try:
        vault = Vault.from_settings(Settings.from_env({**env, "REDIS_URL": server.url}))
        code = authorize_code(sandbox, vault, team_id="77", user_id="4242")
        server.kill()

        with pytest.raises(GrantKept, match="it is kept"):
            vault.exchange(code)

        server.start()
        vault.recover()
        stored = vault.store.load(CredentialId("77", "4242"))
        assert stored.refresh_token == Secret(sandbox.grant("77", "4242")["refresh_token"])
    finally:
        server.stop()


def test_grant_without_ids_is_refused(vault: Vault) -> None:
    grant = TokenGrant(Secret("a"), Secret("r"), 3599, None, None, "", "bearer")
    with pytest.raises(VaultError, match="team_id or user_id"):
        vault.store_grant(grant)
    assert list(vault.store.ids()) == []


def test_ids_with_odd_characters_are_refused(vault: Vault) -> None:
    with pytest.raises(VaultError, match="team_id"):
        vault.import_response(
            {
                "access_token": "a",
                "refresh_token": "r",
                "expires_in": 3599,
                "team_id": "1*:x",
                "user_id": "2",
            }
        )
    assert CredentialId.parse("1:2") == CredentialId("1", "2")


@EVERY_DIALECT
def test_revoke_ends_the_grant_at_miro_and_deletes_the_credential(
    sandbox: Sandbox, vault: Vault, connect: Any
) -> None:
    credential = connect()
    assert vault.revoke(credential.id) is True
    assert sandbox.stats()["revokes"] == 1
    assert sandbox.grant(credential.id.team_id, credential.id.user_id)["revoked"]
    assert list(vault.store.ids()) == []
    assert vault.store.due_at(credential.id) is None


@EVERY_DIALECT
def test_revoke_of_an_expired_access_token_renews_it_and_ends_the_grant_at_miro(
    sandbox: Sandbox, env: dict[str, str], later: Later
) -> None:
    vault = Vault.from_settings(Settings.from_env({**env, "REFRESH_POLICY": "keepalive"}))
    credential = vault.import_response(sandbox.create_grants(1)[0])
    _two_hours_later(later, vault)

    assert vault.revoke(credential.id) is True

    grant = sandbox.grant(credential.id.team_id, credential.id.user_id)
    assert grant["revoked"] and grant["rotations"] == 1
    assert sandbox.stats()["revokes"] == 1
    assert list(vault.store.ids()) == []
    with pytest.raises(Refused):  # the grant's last refresh token is dead at Miro
        vault.client.refresh(Secret(grant["refresh_token"]))


@EVERY_DIALECT
@pytest.mark.parametrize("expired", [False, True], ids=["alive", "expired"])
def test_revoke_of_a_grant_the_user_removed_deletes_it(
    sandbox: Sandbox, vault: Vault, connect: Any, later: Later, expired: bool
) -> None:
    credential = connect()  # a success: the app's credentials work
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)
    if expired:
        _two_hours_later(later, vault)

    assert vault.revoke(credential.id) is False
    assert list(vault.store.ids()) == []
    assert sandbox.stats()["revokes"] == 0


@EVERY_DIALECT
@pytest.mark.parametrize("expired", [False, True], ids=["alive", "expired"])
def test_revoke_with_a_wrong_client_secret_deletes_nothing(
    sandbox: Sandbox, vault: Vault, connect: Any, env: dict[str, str], later: Later, expired: bool
) -> None:
    credential = connect()
    wrong = Vault.from_settings(Settings.from_env({**env, "MIRO_CLIENT_SECRET": "not-it"}))
    if expired:
        _two_hours_later(later, vault, wrong)

    with pytest.raises(NotRevoked, match="doctor"):
        wrong.revoke(credential.id)

    assert not sandbox.grant(credential.id.team_id, credential.id.user_id)["revoked"]
    assert vault.store.load(credential.id).state is State.ACTIVE
    assert vault.rotate_now(credential.id).outcome is Outcome.ROTATED  # its pair still works


def test_revoke_keeps_the_credential_when_miro_is_unreachable(
    env: dict[str, str], vault: Vault, connect: Any
) -> None:
    credential = connect()
    offline = Vault.from_settings(
        Settings.from_env({**env, "MIRO_API_URL": f"http://127.0.0.1:{free_port()}"})
    )
    with pytest.raises(Transient, match="cannot reach Miro"):
        offline.revoke(credential.id)
    assert vault.store.load(credential.id) == credential


def test_every_thread_of_a_large_worker_gets_a_redis_connection_at_once(
    env: dict[str, str],
) -> None:
    threads = 150  # past redis-py's default cap of 100 connections
    client = connect_redis(Settings.from_env({**env, "WORKER_CONCURRENCY": str(threads)}))
    all_in = threading.Barrier(threads)

    def hold_a_connection(index: int) -> object:
        all_in.wait(timeout=30)
        return client.blpop([f"nothing-here:{index}"], timeout=1)  # holds it for a second

    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(hold_a_connection, range(threads)))

    assert answers == [None] * threads
    client.close()
