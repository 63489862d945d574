"""The rescue journal: rotated pairs survive on disk until Redis takes them, exactly once."""

from __future__ import annotations

import contextlib
import secrets
import select
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import free_port, wait_for
from tests.test_store import put_one
from worker.credential import Credential, CredentialId, State
from worker.crypto import TokenCipher
from worker.journal import Journal, JournalEntry, KeptGrant, ReplayReport
from worker.lock import LockRequest, single_flight
from worker.record import RawRecord, encode
from worker.redis_server import RedisServer
from worker.secret import Secret
from worker.store import CredentialStore

ALICE = CredentialId("1", "100")
#: A Redis user that may read and run scripts but not write: a Redis that refuses the replay.
READER = "journal-test-reader"


@pytest.fixture
def store(redis_client: redis.Redis) -> CredentialStore:
    return CredentialStore(redis_client, TokenCipher.from_text(Fernet.generate_key().decode()))


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "var")


def _credential(version: int = 1) -> Credential:
    return Credential(
        id=ALICE,
        access_token=Secret(secrets.token_urlsafe(30)),
        refresh_token=Secret(secrets.token_urlsafe(30)),
        access_expires_at=1_700_003_599,
        refresh_expires_at=1_705_184_000,
        version=version,
    )


def _rotated_entry(store: CredentialStore, stored: Credential, due: float | None) -> JournalEntry:
    """The entry a rotation of ``stored`` would spill: its successor, CAS on its version."""
    rotated = replace(
        stored, access_token=Secret(secrets.token_urlsafe(30)), version=stored.version + 1
    )
    return JournalEntry(str(ALICE), str(stored.version), encode(rotated, store.cipher), due)


def _spill_a_rotation(
    store: CredentialStore, journal: Journal, due: float | None = None
) -> JournalEntry:
    """A stored credential whose rotation spilled: the entry waiting in the journal."""
    entry = _rotated_entry(store, put_one(store, _credential(), due=None), due)
    journal.spill(entry)
    return entry


def _unreachable_store(store: CredentialStore) -> CredentialStore:
    closed = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    return CredentialStore(closed, store.cipher)


def test_spill_appends_entries_that_read_back_exactly(
    store: CredentialStore, journal: Journal
) -> None:
    assert not journal.pending() and journal.entries() == []
    stored = put_one(store, _credential(), due=None)
    first = _rotated_entry(store, stored, 1_700_000_100.0)
    second = _rotated_entry(store, stored, None)

    journal.spill(first)
    journal.spill(second)

    assert journal.pending()
    assert journal.entries() == [first, second]


def test_the_journal_file_is_private(store: CredentialStore, journal: Journal) -> None:
    journal.spill(_rotated_entry(store, _credential(), None))
    assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600


def test_replay_writes_the_pair_and_its_schedule_and_empties_the_journal(
    store: CredentialStore, journal: Journal
) -> None:
    entry = _spill_a_rotation(store, journal, 1_700_000_100.0)

    report = journal.replay(store)

    assert report == ReplayReport(applied=1)
    assert store.raw(ALICE) == entry.record
    assert store.due_at(ALICE) == 1_700_000_100.0
    assert not journal.pending() and journal.entries() == []
    assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600


def test_replay_is_idempotent(store: CredentialStore, journal: Journal) -> None:
    entry = _spill_a_rotation(store, journal)
    journal.spill(entry)  # spilled twice, e.g. by a retry

    # The second finds its own bytes already stored: written once, and counted as written.
    assert journal.replay(store) == ReplayReport(applied=2)
    assert journal.replay(store) == ReplayReport()
    assert store.raw(ALICE) == entry.record
    assert store.load(ALICE).version == 2


def test_replay_over_a_record_marked_meanwhile_restores_the_pair_and_names_it(
    store: CredentialStore, journal: Journal
) -> None:
    entry = _spill_a_rotation(store, journal)
    # Another host tried the consumed refresh token and gave the credential up: a header
    # change, which leaves the version alone (only a new pair moves it).
    marked = RawRecord.parse(store.raw(ALICE) or b"").with_header(state=State.NEEDS_REAUTH)
    assert store.write(ALICE, "1", marked, None)

    report = journal.replay(store)

    assert report == ReplayReport(applied=1, restored_over=((str(ALICE), State.NEEDS_REAUTH),))
    assert store.raw(ALICE) == entry.record
    assert store.load(ALICE).state is State.ACTIVE


def test_replay_drops_an_entry_whose_credential_moved_on(
    store: CredentialStore, journal: Journal
) -> None:
    _spill_a_rotation(store, journal)
    reconnected = put_one(store, _credential(), due=None)  # version 2: a newer grant

    assert journal.replay(store) == ReplayReport(superseded=1)
    assert store.load(ALICE) == reconnected
    assert not journal.pending()


def test_replay_keeps_entries_while_redis_is_unreachable(
    store: CredentialStore, journal: Journal
) -> None:
    entry = _spill_a_rotation(store, journal)

    report = journal.replay(_unreachable_store(store))

    assert report == ReplayReport(remaining=1)
    assert journal.entries() == [entry]
    assert store.raw(ALICE) != entry.record
    assert journal.replay(store) == ReplayReport(applied=1)  # Redis is back
    assert store.raw(ALICE) == entry.record


def test_replay_keeps_an_entry_redis_refuses_and_says_why(
    store: CredentialStore,
    journal: Journal,
    redis_client: redis.Redis,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    entry = _spill_a_rotation(store, journal)
    password = secrets.token_hex(8)
    redis_client.acl_setuser(
        READER,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        commands=["+@read", "+@scripting"],  # the script runs; its first write is refused
    )
    try:
        reader = redis.Redis.from_url(redis_server.url, username=READER, password=password)
        report = journal.replay(CredentialStore(reader, store.cipher))
    finally:
        redis_client.acl_deluser(READER)

    assert report == ReplayReport(remaining=1)
    assert journal.entries() == [entry]
    assert "Redis refused the pair of 1:100 (ResponseError" in caplog.text
    assert journal.replay(store) == ReplayReport(applied=1)  # Redis takes writes again


def test_replay_lets_go_of_the_lock_the_rotation_kept(
    store: CredentialStore, journal: Journal, redis_client: redis.Redis
) -> None:
    stored = put_one(store, _credential(), due=None)
    with single_flight(redis_client, LockRequest(str(ALICE), 30), wait=0) as flight:
        flight.released = True  # kept, as a rotation keeps it when it spills
    entry = replace(_rotated_entry(store, stored, None), lock_owner=flight.owner)
    journal.spill(entry)

    assert journal.entries() == [entry]  # the owner token survives the trip to disk
    assert redis_client.exists(flight.key)
    assert journal.replay(store) == ReplayReport(applied=1)
    assert not redis_client.exists(flight.key)


def test_an_entry_written_before_locks_were_kept_still_reads() -> None:
    line = b'{"id": "1:100", "expected": "1", "record": "", "due": null}\n'
    assert JournalEntry.from_line(line) == JournalEntry("1:100", "1", b"", None, lock_owner="")


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """A port that accepts connections and never answers: a Redis that hangs."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def _store_behind(
    listener: socket.socket, store: CredentialStore, timeout: float
) -> CredentialStore:
    port = listener.getsockname()[1]
    client = redis.Redis(port=port, socket_timeout=timeout, retry=Retry(NoBackoff(), 0))
    return CredentialStore(client, store.cipher)


def test_replay_stops_at_the_first_entry_that_finds_redis_unreachable(
    store: CredentialStore, journal: Journal, silent: socket.socket
) -> None:
    for user in ("100", "101", "102"):
        stored = put_one(store, replace(_credential(), id=CredentialId("1", user)), due=None)
        journal.spill(replace(_rotated_entry(store, stored, None), credential_id=f"1:{user}"))

    report = journal.replay(_store_behind(silent, store, timeout=0.2))

    assert report == ReplayReport(remaining=3)
    assert _connections_waiting(silent) == 1  # one timeout, not one per entry
    assert journal.replay(store) == ReplayReport(applied=3)


def test_a_spill_never_waits_on_a_replay_and_a_second_replay_leaves_it_the_work(
    store: CredentialStore, journal: Journal, silent: socket.socket
) -> None:
    stored = put_one(store, _credential(), due=None)
    journal.spill(_rotated_entry(store, stored, None))
    stalled = _store_behind(silent, store, timeout=5)
    replay = threading.Thread(target=journal.replay, args=(stalled,))
    replay.start()
    wait_for(lambda: select.select([silent], [], [], 0)[0], message="the replay to call Redis")

    late = _rotated_entry(store, stored, None)
    journal.spill(late)  # while the replay waits on Redis
    assert journal.replay(store) == ReplayReport()  # it is running: nothing to do here
    assert replay.is_alive()  # both came back before the replay's 5 s timeout
    assert _connections_waiting(silent) == 1  # hung up on: the replay gives up at once
    replay.join(timeout=30)
    assert not replay.is_alive()

    assert late in journal.entries()  # the replay's rewrite kept what was spilled meanwhile
    assert len(journal.entries()) == 2


def _connections_waiting(listener: socket.socket) -> int:
    listener.setblocking(False)
    count = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            listener.accept()[0].close()
            count += 1
    return count


def test_a_replay_that_takes_nothing_leaves_the_journal_as_it_is(
    store: CredentialStore, journal: Journal
) -> None:
    journal.path.parent.mkdir(parents=True, exist_ok=True)
    journal.path.write_bytes(b'{"id": "1:100", "expected": "1", "rec\n')  # a torn write
    before = journal.mark()

    assert journal.replay(store) == ReplayReport(remaining=1, unreadable=1)

    assert journal.mark() == before  # rotations keep the locks they take ahead


def test_replay_keeps_an_unreadable_line_and_applies_the_rest(
    store: CredentialStore, journal: Journal
) -> None:
    entry = _spill_a_rotation(store, journal)
    with journal.path.open("ab") as file:
        file.write(b'{"id": "1:100", "expected": "1", "rec\n')  # a torn write

    report = journal.replay(store)

    assert report == ReplayReport(applied=1, remaining=1, unreadable=1)
    assert store.raw(ALICE) == entry.record
    assert journal.path.read_bytes() == b'{"id": "1:100", "expected": "1", "rec\n'
    assert journal.pending()


@pytest.mark.parametrize(
    "line",
    [
        b"null\n",
        b"[1, 2]\n",
        b'"text"\n',
        b'{"id": "no-colon", "expected": "1", "record": "", "due": null}\n',
    ],
)
def test_replay_keeps_a_json_line_that_is_not_an_entry(
    store: CredentialStore, journal: Journal, line: bytes
) -> None:
    journal.path.parent.mkdir(parents=True)
    journal.path.write_bytes(line)
    assert journal.replay(store) == ReplayReport(remaining=1, unreadable=1)
    assert journal.path.read_bytes() == line


def test_replay_of_no_journal_does_nothing(store: CredentialStore, journal: Journal) -> None:
    assert journal.replay(store) == ReplayReport()
    assert not journal.path.exists()


def test_a_kept_grant_waits_beside_rotated_pairs_until_it_is_stored(
    store: CredentialStore, journal: Journal
) -> None:
    stored = put_one(store, _credential(), None)
    journal.spill(_rotated_entry(store, stored, None))
    kept = KeptGrant(encode(_credential(), store.cipher), team_id="1")
    journal.keep(kept)
    handed: list[KeptGrant] = []

    report = journal.replay(store)
    waiting = journal.store_kept(lambda grant: bool(handed.append(grant)))

    assert (report.applied, report.unreadable, report.remaining) == (1, 0, 1)
    assert (waiting, handed, journal.pending_count()) == (0, [kept], 1)
    assert journal.store_kept(lambda grant: True) == 1
    assert journal.pending_count() == 0
