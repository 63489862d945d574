"""Rotation under concurrency, Redis outages and bad input: the guarantees of the vault."""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from settings import Settings
from tests.conftest import EVERY_DIALECT, free_port, wait_for
from tests.relay import ReplyDroppingRelay
from worker import scripts
from worker.constants import (
    FAILING,
    OUTCOME_COUNTERS,
    PAUSED_KEY,
    RATE_LIMIT_HOLD_KEY,
    RATE_LIMIT_KEY,
    credential_key,
    lock_key,
)
from worker.credential import Credential, CredentialId, State
from worker.crypto import TokenCipher
from worker.incident import IncidentGuard
from worker.journal import Journal, JournalEntry
from worker.outcomes import Outcome, RotationResult, StateChange
from worker.record import RawRecord, encode
from worker.redis_server import RedisServer
from worker.sandbox import Sandbox
from worker.schedule import ACCESS_LAST_CHANCE_FRACTION, BACKOFF_BASE, JITTER_FRACTION
from worker.secret import Secret
from worker.store import CredentialStore
from worker.vault import Vault

PROCESSES = 5
THREADS = 50


def _force_in_process(env: dict[str, str], credential_id: str, barrier: Any, out: Any) -> None:
    vault = Vault.from_settings(Settings.from_env(env))
    request = _force_request(vault, CredentialId.parse(credential_id))
    barrier.wait()
    out.put(request())


def _force_request(vault: Vault, credential_id: CredentialId) -> Any:
    """A forced rotation asked for now (it sees today's version), to be run later."""
    seen = vault.rotator.version_now(credential_id)
    return lambda: vault.rotate_now(credential_id, seen_version=seen).outcome.value


def test_50_threads_and_5_processes_forcing_one_credential_make_one_refresh(
    sandbox: Sandbox, vault: Vault, connect: Any, env: dict[str, str]
) -> None:
    credential = connect()
    sandbox.set_faults(latency_ms=300)  # everyone is waiting while the one refresh runs
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES + THREADS)
    out = context.Queue()
    processes = [
        context.Process(target=_force_in_process, args=(env, str(credential.id), barrier, out))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()

    def force() -> str:
        request = _force_request(vault, credential.id)
        barrier.wait()
        return str(request())

    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = list(pool.map(lambda _: force(), range(THREADS)))
    outcomes += [out.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)

    assert sorted(set(outcomes)) == ["lost_race", "rotated"]
    assert outcomes.count("rotated") == 1
    assert sandbox.stats()["refreshes"] == 1
    assert sandbox.stats()["reused_refresh_tokens"] == 0
    grant = sandbox.grant(credential.id.team_id, credential.id.user_id)
    assert vault.store.load(credential.id).refresh_token == Secret(grant["refresh_token"])


def test_scheduled_rotations_of_a_fresh_credential_do_not_call_miro(
    sandbox: Sandbox, vault: Vault, connect: Any
) -> None:
    credential = connect()
    results = [vault.rotator.rotate(credential.id) for _ in range(3)]
    assert {result.outcome for result in results} == {Outcome.SKIPPED_FRESH}
    assert sandbox.stats()["refreshes"] == 0
    assert vault.store.due_at(credential.id) == pytest.approx(results[-1].retry_at)


def test_rotations_that_do_not_call_miro_give_their_slot_back(
    sandbox: Sandbox, env: dict[str, str], redis_client: redis.Redis
) -> None:
    redis_client.delete(RATE_LIMIT_KEY)
    vault = Vault.from_settings(Settings.from_env({**env, "MIRO_TOKEN_RATE": "1"}))
    credential = vault.import_response(sandbox.create_grants(1)[0])
    # Eight slots of a one-per-second limit, had they been kept: the next would be refused.
    for _ in range(8):
        assert vault.rotator.rotate(credential.id).outcome is Outcome.SKIPPED_FRESH

    # Kept, they would put its slot 8 s away, past the 5 s a rotation waits: rate_limited.
    assert vault.rotate_now(credential.id).outcome is Outcome.ROTATED
    redis_client.delete(RATE_LIMIT_KEY)


def test_a_busy_lock_is_not_waited_for_on_the_scheduled_path(
    vault: Vault, connect: Any, redis_client: redis.Redis
) -> None:
    credential = connect()
    with redis_client.lock(f"mtk:lock:{credential.id}", timeout=10):
        assert vault.rotator.rotate(credential.id, force=True).outcome is Outcome.BUSY


def test_a_task_of_several_credentials_rotates_each_due_one_and_survives_a_bad_one(
    sandbox: Sandbox, vault: Vault, connect: Any, redis_client: redis.Redis
) -> None:
    due = [vault.import_response({**r, "expires_in": 60}) for r in sandbox.create_grants(2)]
    fresh = connect()
    odd = CredentialId.of("9", "wrong-type")
    redis_client.rpush(credential_key(str(odd)), "not a record")  # GET fails: WRONGTYPE
    successes = vault.rotator.guard.successes()  # the exchange of the fresh one is one

    results = vault.rotator.rotate_due([due[0].id, odd, fresh.id, due[1].id])

    assert [r.credential_id for r in results] == [
        str(due[0].id),
        str(odd),
        str(fresh.id),
        str(due[1].id),
    ]
    assert [r.outcome for r in results] == [
        Outcome.ROTATED, Outcome.FAILED, Outcome.SKIPPED_FRESH, Outcome.ROTATED,
    ]  # fmt: skip
    assert "WRONGTYPE" in (results[1].detail or "")
    assert sandbox.stats()["refreshes"] == 2
    assert all(vault.store.load(c.id).version == 2 for c in due)
    counted = {k.decode(): int(v) for k, v in redis_client.hgetall(OUTCOME_COUNTERS).items()}
    assert counted == {"rotated": 2, "failed": 1, "skipped_fresh": 1}  # failures and skips too
    assert vault.rotator.guard.successes() == successes + 2


_PAUSE_READING = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(PAUSED_KEY), PAUSED_KEY.encode())


class _CountingConnection(redis.Connection):
    """Counts what it sends: each send is one round trip (a pipeline is one too).

    Reads of the pause flag are left out: a process reads it at most once a second, so how
    many a test sees depends on how fast it runs.
    """

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        packed = command if isinstance(command, bytes) else b"".join(command)
        if packed != _PAUSE_READING:
            _CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def test_a_scheduled_rotation_costs_one_round_trip_and_its_task_three_more(
    sandbox: Sandbox, settings: Settings, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    pool = redis.ConnectionPool.from_url(redis_server.url, connection_class=_CountingConnection)
    vault = Vault.from_settings(settings, redis.Redis(connection_pool=pool))
    first, *due = [vault.import_response({**r, "expires_in": 60}) for r in sandbox.create_grants(5)]
    vault.rotator.rotate_due([first.id])  # loads the scripts into Redis
    _CountingConnection.sent = 0

    results = vault.rotator.rotate_due([c.id for c in due])

    assert {result.outcome for result in results} == {Outcome.ROTATED}
    # Each: commit, let go of the lock, and take the next one's (read its record, reserve its
    # call to Miro). The task: the first take, count outcomes, count successes.
    assert _CountingConnection.sent == len(due) + 3


def _journaled_rotation(vault: Vault, credential: Credential) -> JournalEntry:
    """Its next pair, rotated at Miro by an earlier rotation of this host and waiting in the
    journal with no lock kept (an older entry, or one whose lock's TTL ran out)."""
    grant = vault.client.refresh(credential.refresh_token)
    rotated = replace(
        credential, access_token=grant.access_token, refresh_token=grant.refresh_token, version=2
    )
    return JournalEntry(str(credential.id), "1", encode(rotated, vault.store.cipher), None)


def _after_the_first_commit(
    sandbox: Sandbox, vault: Vault, action: Callable[[Credential], object]
) -> tuple[list[RotationResult], Credential]:
    """A task of two credentials; ``action(second)`` runs once the first has committed and
    taken the second's lock ahead (a listener: the first comes back from undecryptable)."""
    first, second = [
        vault.import_response({**r, "expires_in": 60}) for r in sandbox.create_grants(2)
    ]
    flagged = RawRecord.parse(vault.store.raw(first.id) or b"").with_header(
        state=State.UNDECRYPTABLE
    )
    assert vault.store.write(first.id, "1", flagged, due=None)
    vault.listeners.append(lambda change: action(second))
    return vault.rotator.rotate_due([first.id, second.id]), second


@pytest.mark.parametrize("journal_before", ["none", "an empty one"])
@pytest.mark.parametrize("replayed_by", ["its own rotation", "another thread"])
def test_a_lock_taken_ahead_is_taken_anew_after_the_journal_changed(
    sandbox: Sandbox, vault: Vault, replayed_by: str, journal_before: str
) -> None:
    journal = vault.rotator.journal
    if journal_before == "an empty one":  # a host that journaled and replayed before
        journal.path.parent.mkdir(parents=True, exist_ok=True)
        journal.path.touch()

    def spill(second: Credential) -> None:
        journal.spill(_journaled_rotation(vault, second))
        if replayed_by == "another thread":
            journal.replay(vault.store)  # over before the second rotation looks at it

    results, second = _after_the_first_commit(sandbox, vault, spill)

    assert [r.outcome for r in results] == [Outcome.ROTATED, Outcome.ROTATED]
    assert vault.store.load(second.id).version == 3
    assert sandbox.stats()["reused_refresh_tokens"] == 0


def test_a_journal_that_cannot_be_read_lets_go_of_the_lock_taken_ahead(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    def break_journal(second: Credential) -> None:
        path = vault.rotator.journal.path
        path.mkdir(parents=True)  # reading it fails: IsADirectoryError
        (path / "entry").touch()  # and its size is not 0 on any filesystem

    results, second = _after_the_first_commit(sandbox, vault, break_journal)

    assert [r.outcome for r in results] == [Outcome.ROTATED, Outcome.FAILED]
    assert not redis_client.exists(lock_key(str(second.id)))


class _HardShutdown(BaseException):
    """What a worker's hard shutdown raises in its threads (not an Exception)."""


def test_an_interrupted_task_leaves_no_lock_taken_ahead(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    def interrupt(second: Credential) -> None:
        raise _HardShutdown

    with pytest.raises(_HardShutdown):
        _after_the_first_commit(sandbox, vault, interrupt)

    assert not list(redis_client.scan_iter(lock_key("*")))


def test_a_refusal_is_judged_on_a_fresh_reading_of_the_pause(
    sandbox: Sandbox, vault: Vault, connect: Any, redis_client: redis.Redis
) -> None:
    credential = connect()
    sandbox.set_faults(lose_rate=1.0)  # Miro rotates but the answer is lost: the next is refused
    assert vault.rotate_now(credential.id).outcome is Outcome.RESCHEDULED
    sandbox.set_faults(lose_rate=0.0)
    assert vault.rotator.guard.paused(max_age=60) is None  # a reading this process keeps
    IncidentGuard(redis_client).pause("an outage seen by another worker")

    result = vault.rotate_now(credential.id)

    assert result.outcome is Outcome.PAUSED  # not needs_reauth on the stale reading
    assert vault.store.load(credential.id).state is State.ACTIVE


@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    """A Redis of this test's own, which the test may kill."""
    server = RedisServer(tmp_path / "redis", free_port()).start()
    yield server
    if server.process is not None:
        server.stop()


def _rotation_during_outage(
    sandbox: Sandbox,
    env: dict[str, str],
    server: RedisServer,
    fault: Callable[[RedisServer], object] = RedisServer.kill,
    redis_url: str = "",
) -> tuple[Vault, CredentialId, dict[str, Any], threading.Thread]:
    """A forced rotation whose commit meets ``fault``: it starts while Miro is rotating."""
    vault = Vault.from_settings(Settings.from_env({**env, "REDIS_URL": redis_url or server.url}))
    [response] = sandbox.create_grants(1)
    credential = vault.import_response(response)
    sandbox.set_faults(hang_rate=1.0, hang_s=1.0)  # Miro answers one second after the call
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(outcome=vault.rotate_now(credential.id).outcome)
    )
    thread.start()
    wait_for(lambda: sandbox.stats()["hung"] >= 1, message="the refresh call to reach Miro")
    fault(server)  # Redis dies, or stops taking writes, while Miro is rotating the pair
    return vault, credential.id, result, thread


def _read_only(server: RedisServer) -> None:
    """What clients of a master see after a failover: it is a replica now, and refuses writes."""
    redis.Redis.from_url(server.url).replicaof("127.0.0.1", str(free_port()))


def _out_of_memory(server: RedisServer) -> None:
    redis.Redis.from_url(server.url).config_set("maxmemory", "1")


def _writable_again(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    client.replicaof("NO", "ONE")
    client.config_set("maxmemory", "0")


def _holds_current_pair(sandbox: Sandbox, vault: Vault, credential_id: CredentialId) -> bool:
    grant = sandbox.grant(credential_id.team_id, credential_id.user_id)
    stored = vault.store.load(credential_id)
    return stored.refresh_token == Secret(grant["refresh_token"]) and stored.version == 2


def test_redis_back_within_the_retry_window_takes_the_pair(
    sandbox: Sandbox, env: dict[str, str], own_redis: RedisServer
) -> None:
    vault, credential_id, result, thread = _rotation_during_outage(sandbox, env, own_redis)
    wait_for(lambda: sandbox.stats()["refreshes"] == 1, message="Miro to rotate")
    own_redis.start()
    thread.join(timeout=30)

    assert result["outcome"] is Outcome.ROTATED
    assert _holds_current_pair(sandbox, vault, credential_id)
    assert not Journal(Path(env["DATA_DIR"])).pending()


def test_an_import_while_redis_restarts_is_stored_once_it_is_back(
    sandbox: Sandbox, env: dict[str, str], own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    vault = Vault.from_settings(Settings.from_env({**env, "REDIS_URL": own_redis.url}))
    responses = sandbox.create_grants(3)
    own_redis.kill()
    stored: list[Credential] = []
    thread = threading.Thread(target=lambda: stored.extend(vault.import_many(responses)))
    thread.start()
    wait_for(lambda: "sending again" in caplog.text, message="the import to meet the outage")
    own_redis.start()
    thread.join(timeout=30)

    assert [credential.version for credential in stored] == [1, 1, 1]
    assert [vault.store.load(credential.id) for credential in stored] == stored


def test_an_import_fails_when_redis_stays_away_past_the_retry_window(
    sandbox: Sandbox, env: dict[str, str], own_redis: RedisServer
) -> None:
    settings = Settings.from_env({**env, "REDIS_URL": own_redis.url, "COMMIT_RETRY_SECONDS": "0.3"})
    vault = Vault.from_settings(settings)
    own_redis.kill()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        vault.import_response(sandbox.create_grants(1)[0])
    assert 0.2 <= time.monotonic() - started < 5


def test_a_refused_login_is_not_sent_again(own_redis: RedisServer, encryption_key: str) -> None:
    redis.Redis.from_url(own_redis.url).config_set("requirepass", "not-ours")
    store = CredentialStore(
        redis.Redis.from_url(own_redis.url), TokenCipher.from_text(encryption_key), 20.0
    )
    credential = Credential(CredentialId.of("1", "100"), Secret("a"), Secret("r"), None, None)
    started = time.monotonic()
    with pytest.raises(redis.AuthenticationError):
        store.put_many([(credential, None)])
    assert time.monotonic() - started < 1  # not resent for 20 s: it would never pass


def test_redis_down_past_the_retry_window_spills_to_the_journal_and_replays(
    sandbox: Sandbox, env: dict[str, str], own_redis: RedisServer
) -> None:
    _, credential_id, result, thread = _rotation_during_outage(sandbox, env, own_redis)
    thread.join(timeout=30)
    assert result["outcome"] is Outcome.JOURNALED
    journal = Journal(Path(env["DATA_DIR"]))
    assert journal.pending()
    raw = journal.path.read_bytes()
    grant = sandbox.grant(credential_id.team_id, credential_id.user_id)
    assert grant["refresh_token"].encode() not in raw  # the journal holds ciphertext only

    own_redis.start()
    restarted = Vault.from_settings(Settings.from_env({**env, "REDIS_URL": own_redis.url}))

    assert _holds_current_pair(sandbox, restarted, credential_id)
    assert not journal.pending()
    assert sandbox.stats()["reused_refresh_tokens"] == 0


def test_a_pair_journaled_past_the_lock_ttl_outlives_another_host_trying_the_consumed_token(
    sandbox: Sandbox, env: dict[str, str], own_redis: RedisServer, tmp_path: Path
) -> None:
    brief = {**env, "HTTP_TIMEOUT": "2", "COMMIT_RETRY_SECONDS": "1", "LOCK_TTL": "4"}
    vault, credential_id, result, thread = _rotation_during_outage(sandbox, brief, own_redis)
    lock_gone_at = time.time() + 4  # the lock was taken before the call to Miro
    thread.join(timeout=30)
    assert result["outcome"] is Outcome.JOURNALED
    sandbox.set_faults(hang_rate=0.0)  # Miro answers at once from here on
    changes: list[StateChange] = []
    vault.listeners.append(changes.append)
    wait_for(lambda: time.time() > lock_gone_at, message="Redis to stay away past LOCK_TTL")
    own_redis.start()

    # Another host, with a journal of its own, finds the credential unlocked: it tries the
    # stored refresh token, which Miro consumed for the pair now in the first host's journal.
    other_host = {**brief, "REDIS_URL": own_redis.url, "DATA_DIR": str(tmp_path / "other")}
    other = Vault.from_settings(Settings.from_env(other_host))
    assert not other.redis.exists(lock_key(str(credential_id)))
    assert other.rotate_now(credential_id).outcome is Outcome.NEEDS_REAUTH
    assert sandbox.stats()["reused_refresh_tokens"] == 1

    report = vault.recover()  # the first host's replay comes round

    assert report.restored_over == ((str(credential_id), State.NEEDS_REAUTH),)
    assert _holds_current_pair(sandbox, other, credential_id)
    assert other.store.load(credential_id).state is State.ACTIVE
    assert changes == [StateChange(str(credential_id), State.NEEDS_REAUTH, State.ACTIVE, None)]
    assert other.rotate_now(credential_id).outcome is Outcome.ROTATED


@pytest.mark.parametrize("fault", [_read_only, _out_of_memory], ids=["readonly", "oom"])
def test_a_commit_refused_by_redis_is_retried_until_redis_takes_it(
    sandbox: Sandbox,
    env: dict[str, str],
    own_redis: RedisServer,
    fault: Callable[[RedisServer], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    patient = {**env, "COMMIT_RETRY_SECONDS": "20", "LOCK_TTL": "40"}  # no spill meanwhile
    vault, credential_id, result, thread = _rotation_during_outage(
        sandbox, patient, own_redis, fault
    )
    refused = f"commit of {credential_id} refused"
    wait_for(lambda: refused in caplog.text, message="Redis to refuse the commit")
    _writable_again(own_redis)
    thread.join(timeout=30)

    assert result["outcome"] is Outcome.ROTATED
    assert _holds_current_pair(sandbox, vault, credential_id)
    assert not Journal(Path(env["DATA_DIR"])).pending()
    assert not vault.redis.exists(lock_key(str(credential_id)))


def test_a_commit_refused_past_the_retry_window_keeps_the_lock_until_it_is_replayed(
    sandbox: Sandbox, env: dict[str, str], own_redis: RedisServer
) -> None:
    vault, credential_id, result, thread = _rotation_during_outage(
        sandbox, env, own_redis, _read_only
    )
    thread.join(timeout=30)
    assert result["outcome"] is Outcome.JOURNALED
    _writable_again(own_redis)
    # The stored refresh token is the one Miro consumed: no other host may use it meanwhile.
    assert vault.redis.exists(lock_key(str(credential_id)))

    restarted = Vault.from_settings(Settings.from_env({**env, "REDIS_URL": own_redis.url}))

    assert _holds_current_pair(sandbox, restarted, credential_id)
    assert not Journal(Path(env["DATA_DIR"])).pending()
    assert not vault.redis.exists(lock_key(str(credential_id)))


#: What names the commit's script on the wire (its EVALSHA).
COMMIT_SCRIPT = hashlib.sha1(scripts.source("write_if_version").encode()).hexdigest().encode()


@pytest.fixture
def relay(own_redis: RedisServer) -> Iterator[ReplyDroppingRelay]:
    """A relay in front of this test's Redis that can lose one reply."""
    running = ReplyDroppingRelay(own_redis.port).start()
    yield running
    running.close()


def test_a_commit_whose_reply_was_lost_is_known_as_landed(
    sandbox: Sandbox,
    env: dict[str, str],
    own_redis: RedisServer,
    relay: ReplyDroppingRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The commit runs, its reply is lost with the connection, and the retry finds its own bytes."""
    vault, credential_id, result, thread = _rotation_during_outage(
        sandbox, env, own_redis, lambda _: relay.drop_reply_to(COMMIT_SCRIPT), relay.url
    )
    thread.join(timeout=30)

    assert relay.dropped.is_set()
    assert result["outcome"] is Outcome.ROTATED  # not "superseded" by its own first try
    assert _holds_current_pair(sandbox, vault, credential_id)
    assert not Journal(Path(env["DATA_DIR"])).pending()
    assert not redis.Redis.from_url(own_redis.url).exists(lock_key(str(credential_id)))
    assert "had expired before" not in caplog.text  # its first try let go of the lock


@pytest.fixture
def relayed_vault(env: dict[str, str], relay: ReplyDroppingRelay) -> Vault:
    """A vault whose Redis is behind the relay."""
    return Vault.from_settings(Settings.from_env({**env, "REDIS_URL": relay.url}))


def test_a_commit_and_next_take_whose_reply_was_lost_are_known_as_done(
    sandbox: Sandbox,
    relayed_vault: Vault,
    relay: ReplyDroppingRelay,
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both run, their one reply is lost with the connection, and both are sent again."""
    vault = relayed_vault
    due = [vault.import_response({**r, "expires_in": 60}) for r in sandbox.create_grants(2)]
    relay.drop_reply_to(COMMIT_SCRIPT)

    results = vault.rotator.rotate_due([c.id for c in due])

    assert relay.dropped.is_set()
    assert [r.outcome for r in results] == [Outcome.ROTATED, Outcome.ROTATED]
    assert all(_holds_current_pair(sandbox, vault, c.id) for c in due)
    client = redis.Redis.from_url(own_redis.url)
    assert not any(client.exists(lock_key(str(c.id))) for c in due)
    assert "had expired before" not in caplog.text
    assert sandbox.stats()["reused_refresh_tokens"] == 0


def test_a_grant_whose_reply_was_lost_keeps_a_rotation_landed_before_the_resend(
    sandbox: Sandbox,
    env: dict[str, str],
    relayed_vault: Vault,
    relay: ReplyDroppingRelay,
    own_redis: RedisServer,
) -> None:
    """The import lands, a worker rotates the pair it stored, and only then is it sent again.

    Its own bytes are gone by then: without the answer kept by the first try, the resend
    would be refused and store the imported pair again, whose refresh token Miro has spent.
    """
    direct = Vault.from_settings(Settings.from_env({**env, "REDIS_URL": own_redis.url}))
    first, response = sandbox.create_grants(2)
    relayed_vault.import_response(first)  # Redis knows the script: the lost reply is a run's
    credential_id = CredentialId.of(response["team_id"], response["user_id"])
    rotations: list[Outcome] = []
    relay.drop_reply_to(
        COMMIT_SCRIPT, then=lambda: rotations.append(direct.rotate_now(credential_id).outcome)
    )

    relayed_vault.import_response(response)

    assert relay.dropped.is_set()
    assert rotations == [Outcome.ROTATED]
    assert _holds_current_pair(sandbox, direct, credential_id)
    assert sandbox.stats()["reused_refresh_tokens"] == 0


def test_a_corrupt_record_is_reported_and_others_are_untouched(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    good, bad = (vault.import_response(r) for r in sandbox.create_grants(2))
    redis_client.set(credential_key(str(bad.id)), b'{"s":1,"v":1,"st":"act')  # truncated

    result = vault.rotate_now(bad.id)

    assert result.outcome is Outcome.UNREADABLE
    assert "no ciphertext" in (result.detail or "")
    assert vault.store.due_at(bad.id) is not None  # stays visible, retried later
    assert vault.rotate_now(good.id).outcome is Outcome.ROTATED


def test_an_undecryptable_record_is_flagged_not_fatal(
    sandbox: Sandbox, env: dict[str, str], vault: Vault, connect: Any
) -> None:
    from cryptography.fernet import Fernet  # noqa: PLC0415

    other_key = Fernet.generate_key().decode()
    stranger = Vault.from_settings(Settings.from_env({**env, "TOKEN_ENCRYPTION_KEYS": other_key}))
    foreign = stranger.import_response(sandbox.create_grants(1)[0])
    good = connect()

    result = vault.rotate_now(foreign.id)

    assert result.outcome is Outcome.UNREADABLE
    assert "TOKEN_ENCRYPTION_KEYS" in (result.detail or "")
    raw = vault.store.raw(foreign.id)
    assert raw is not None and b'"st":"undecryptable"' in raw
    assert vault.rotate_now(good.id).outcome is Outcome.ROTATED
    # With the right key back, the flagged credential recovers by itself.
    assert stranger.rotate_now(foreign.id).outcome is Outcome.ROTATED
    assert stranger.store.load(foreign.id).state is State.ACTIVE


def test_a_record_whose_key_is_back_is_active_and_scheduled_again_though_not_due(
    sandbox: Sandbox, env: dict[str, str], encryption_key: str
) -> None:
    """The key was left out of TOKEN_ENCRYPTION_KEYS for a while, then put back."""
    from cryptography.fernet import Fernet  # noqa: PLC0415

    other_key = Fernet.generate_key().decode()
    owner = Vault.from_settings(Settings.from_env({**env, "TOKEN_ENCRYPTION_KEYS": other_key}))
    without = Vault.from_settings(Settings.from_env(env))
    credential = owner.import_response({**sandbox.create_grants(1)[0], "expires_in": 3599})
    [unreadable] = without.rotator.rotate_due([credential.id])
    assert unreadable.outcome is Outcome.UNREADABLE
    changes: list[StateChange] = []

    keys = f"{encryption_key},{other_key}"
    back = Vault.from_settings(Settings.from_env({**env, "TOKEN_ENCRYPTION_KEYS": keys}))
    back.rotator.listeners.append(changes.append)
    [result] = back.rotator.rotate_due([credential.id])

    assert result.outcome is Outcome.SKIPPED_FRESH  # not due: no call to Miro
    stored = back.store.load(credential.id)
    assert stored.state is State.ACTIVE and stored.failure_count == 0
    assert stored.last_error is None
    due, expiry, margin = (
        back.store.due_at(credential.id),
        stored.access_expires_at,
        back.policy.access_margin,
    )
    assert due is not None and expiry is not None
    assert expiry - margin * (1 + JITTER_FRACTION) <= due <= expiry - margin  # as if active
    assert changes == [StateChange(str(credential.id), State.UNDECRYPTABLE, State.ACTIVE, None)]
    assert sandbox.stats()["token_calls"] == 0


def test_a_malformed_miro_response_is_retried_later_and_loses_nothing(
    sandbox: Sandbox, vault: Vault, connect: Any
) -> None:
    credential, other = connect(), connect()
    sandbox.set_faults(error_rate=1.0)

    result = vault.rotate_now(credential.id)

    assert result.outcome is Outcome.RESCHEDULED
    assert "HTTP 500" in (result.detail or "")
    stored = vault.store.load(credential.id)
    assert stored.failure_count == 1 and stored.refresh_token == credential.refresh_token
    assert vault.store.due_at(credential.id) == pytest.approx(result.retry_at)
    sandbox.set_faults(error_rate=0.0)
    assert vault.rotate_now(credential.id).outcome is Outcome.ROTATED
    assert vault.store.load(other.id) == other


def test_rate_limits_are_waited_out_without_counting_as_failures(
    sandbox: Sandbox, vault: Vault, connect: Any, redis_client: redis.Redis
) -> None:
    credential = connect()
    sandbox.set_faults(rate_limit_rate=1.0, rate_limit_reset_s=1.0)
    for _ in range(3):
        assert vault.rotate_now(credential.id).outcome is Outcome.RATE_LIMITED
    limited = vault.store.load(credential.id)
    assert limited.failure_count == 0 and "429" in (limited.last_error or "")
    assert redis_client.zscore(FAILING, str(credential.id)) is None

    sandbox.set_faults(rate_limit_rate=0.0, error_rate=1.0)
    held_until = float(redis_client.get(RATE_LIMIT_HOLD_KEY) or 0)
    started = max(time.time(), held_until)  # the call waits for the last 429's reset
    result = vault.rotate_now(credential.id)

    assert result.outcome is Outcome.RESCHEDULED and result.retry_at is not None
    assert vault.store.load(credential.id).failure_count == 1
    # A first failure's backoff: the three 429s counted, it would be 20 to 40 s.
    assert result.retry_at - started <= BACKOFF_BASE + 1
    assert redis_client.zscore(FAILING, str(credential.id)) is not None


def test_a_failing_credential_is_tried_again_before_its_access_token_expires(
    sandbox: Sandbox, vault: Vault, settings: Settings
) -> None:
    last_chance = settings.access_refresh_margin * ACCESS_LAST_CHANCE_FRACTION
    # Its last chance is 2 s away; a first failure's backoff is 2.5 to 5 s.
    grant = {**sandbox.create_grants(1)[0], "expires_in": int(last_chance) + 2}
    credential = vault.import_response(grant)
    sandbox.set_faults(error_rate=1.0)

    result = vault.rotate_now(credential.id)

    assert result.outcome is Outcome.RESCHEDULED
    assert credential.access_expires_at is not None
    assert result.retry_at is not None
    brought_forward = credential.access_expires_at - last_chance
    assert brought_forward <= result.retry_at <= brought_forward + last_chance * JITTER_FRACTION
    assert vault.store.due_at(credential.id) == pytest.approx(result.retry_at, abs=0.01)


@EVERY_DIALECT
def test_a_lost_answer_is_found_out_as_needs_reauth(
    sandbox: Sandbox, vault: Vault, connect: Any
) -> None:
    credential = connect()
    sandbox.set_faults(lose_rate=1.0)
    assert vault.rotate_now(credential.id).outcome is Outcome.RESCHEDULED
    sandbox.set_faults(lose_rate=0.0)
    assert vault.rotate_now(credential.id).outcome is Outcome.NEEDS_REAUTH
    assert sandbox.grant(credential.id.team_id, credential.id.user_id)["lost"]


@EVERY_DIALECT
def test_a_refused_client_marks_no_credential_dead(
    sandbox: Sandbox, vault: Vault, connect: Any
) -> None:
    credential = connect()
    sandbox.set_faults(reject_all_refresh=True)
    result = vault.rotate_now(credential.id)
    assert result.outcome is Outcome.RESCHEDULED
    assert "MIRO_CLIENT_ID/SECRET" in (result.detail or "")
    assert vault.store.load(credential.id).state is State.ACTIVE
