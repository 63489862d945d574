"""The rescue journal: rotated pairs that could not reach Redis, kept on disk until they do.

Once Miro has answered a refresh, the old refresh token is dead and the new pair exists only
in this process. If Redis stays unreachable past ``COMMIT_RETRY_SECONDS``, the pair (already
encrypted: it is the record's bytes) is appended to ``DATA_DIR/journal.jsonl`` and fsync'd.
Every process replays the journal when it starts and before each rotation while it is not
empty; replay is the same compare-and-swap as the original commit, so it is idempotent and
never overwrites a newer grant.

The rotation keeps its single-flight lock when it spills: until the pair is in Redis, the
stored refresh token is the one Miro has just consumed, and no other host may use it. The
entry carries the lock's owner token, and the replay's compare-and-swap lets go of it.

Should Redis stay away longer than the lock's TTL, another host may reach the credential
first and try the consumed token. Miro refuses it, and that host marks the credential (to be
confirmed later, or ``needs_reauth`` when forced) without changing its version, which only a
new pair does: the replay's compare-and-swap still writes the pair, and its report names the
credentials it brought back, for the rotator to tell its listeners.

A code exchange keeps its new grant here too (:class:`KeptGrant`) when it cannot be stored
at once: Miro's answer named no user and token info failed, or Redis did not take it. The
code is spent, so the pair exists nowhere else. :meth:`Journal.store_kept` hands each to the
vault, which names it and stores it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import redis_errors
from worker.credential import CredentialId, State
from worker.datadir import private_directory
from worker.lock import Flight
from worker.store import CredentialStore, Write

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"


@dataclass(frozen=True)
class JournalEntry:
    """One rotated pair waiting for Redis: the exact compare-and-swap still to be done."""

    credential_id: str
    expected_version: str
    record: bytes
    due: float | None
    #: The owner token of the rotation's lock, still held; "" for none (older entries).
    lock_owner: str = ""

    def to_line(self) -> bytes:
        return (
            json.dumps(
                {
                    "id": self.credential_id,
                    "expected": self.expected_version,
                    "record": base64.b64encode(self.record).decode(),
                    "due": self.due,
                    "lock": self.lock_owner,
                }
            ).encode()
            + b"\n"
        )

    @classmethod
    def from_line(cls, line: bytes) -> JournalEntry:
        data = json.loads(line)
        record = base64.b64decode(data["record"])
        return cls(data["id"], data["expected"], record, data["due"], data.get("lock", ""))

    def held_lock(self) -> Flight | None:
        return Flight.held(self.credential_id, self.lock_owner) if self.lock_owner else None


@dataclass(frozen=True)
class KeptGrant:
    """A new grant that could not be stored yet: its record, and the ids Miro's answer gave."""

    #: The record's bytes (tokens encrypted); a record does not hold its credential's id.
    record: bytes
    team_id: str | None = None
    user_id: str | None = None

    KIND = "grant"

    def to_line(self) -> bytes:
        fields = {"kind": self.KIND, "record": base64.b64encode(self.record).decode()}
        ids = {"team_id": self.team_id, "user_id": self.user_id}
        return json.dumps({**fields, **ids}).encode() + b"\n"

    @classmethod
    def from_json(cls, data: dict[str, object]) -> KeptGrant:
        team_id, user_id = data.get("team_id"), data.get("user_id")
        return cls(
            base64.b64decode(str(data["record"])),
            team_id if isinstance(team_id, str) else None,
            user_id if isinstance(user_id, str) else None,
        )


@dataclass(frozen=True)
class ReplayReport:
    applied: int = 0
    superseded: int = 0
    remaining: int = 0
    unreadable: int = 0
    #: Credentials whose pair was restored over a record in another state than active, with
    #: that state: typically Redis was away longer than the lock's TTL, and another host tried
    #: the refresh token Miro had consumed and marked the credential (see the module's note).
    #: The state is read by the compare-and-swap itself, so no mark made meanwhile goes
    #: unreported; only a replay whose reply was lost, and that finds its own bytes the next
    #: time, does not know it, and the credential is still restored.
    restored_over: tuple[tuple[str, State], ...] = ()


class Journal:
    """An append-only file of :class:`JournalEntry`, guarded by an advisory lock file."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / JOURNAL_NAME
        self._lock_path = data_dir / (JOURNAL_NAME + ".lock")
        self._replay_lock_path = data_dir / (JOURNAL_NAME + ".replay")

    def pending(self) -> bool:
        """Cheap enough to ask before every rotation: one ``stat``."""
        return self.holds_entries(self.mark())

    @staticmethod
    def holds_entries(mark: tuple[int, int, int] | None) -> bool:
        """Whether a journal of this :meth:`mark` has anything in it."""
        return mark is not None and mark[1] > 0

    def mark(self) -> tuple[int, int, int] | None:
        """What a spill or a replay's rewrite changes; None while there is no journal.

        The file's inode (a replay replaces the file), size and modification time.
        """
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def spill(self, entry: JournalEntry) -> None:
        """Append and fsync; when this returns, the pair survives a crash of this process."""
        self._append(entry.to_line())
        log.error(
            "Redis did not take the rotated pair of %s: saved to the journal %s; it is "
            "written to Redis as soon as Redis takes writes again",
            entry.credential_id,
            self.path,
        )

    def keep(self, grant: KeptGrant) -> None:
        """Append and fsync a new grant that could not be stored yet (see :meth:`store_kept`)."""
        self._append(grant.to_line())
        log.error(
            "a new grant could not be stored yet: kept in the journal %s; it is stored by the "
            "next replay that can name it and reach Redis",
            self.path,
        )

    def _append(self, line: bytes) -> None:
        with self._locked():
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, line)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            _fsync_directory(self.path.parent)

    def pending_count(self) -> int:
        """Entries waiting, torn lines included (replay keeps them: they may hold a pair)."""
        with self._locked():
            return sum(1 for _ in self._lines())

    def entries(self) -> list[JournalEntry]:
        with self._locked():
            return list(self._read())

    def replay(self, store: CredentialStore) -> ReplayReport:
        """Write every rotated pair to Redis, keeping on disk only those Redis did not take.

        Redis is written to outside the journal's lock, so a rotation that must spill a pair
        never waits on a replay's timeouts; what is spilled meanwhile stays for the next
        replay. One replay runs at a time on a host, and a caller that finds one running
        leaves the work to it. The first entry that finds Redis unreachable ends the pass.
        Kept grants stay: they are :meth:`store_kept`'s.
        """
        restored_over: list[tuple[str, State]] = []
        tally, remaining = self._pass(lambda line: _apply(store, line, restored_over))
        return ReplayReport(
            tally["applied"],
            tally["superseded"],
            remaining,
            tally["unreadable"],
            tuple(restored_over),
        )

    def store_kept(self, store: Callable[[KeptGrant], bool]) -> int:
        """Hand each kept grant to ``store``, which says whether it stored it; those leave.

        Returns how many were stored.
        """
        tally, _ = self._pass(lambda line: _store_kept(store, line))
        return tally["applied"]

    def _pass(self, apply: Callable[[bytes], str]) -> tuple[Counter[str], int]:
        """``apply`` each entry; those applied or superseded leave the journal.

        Returns the verdicts counted, and how many entries remain. A pass finding another
        running on this host leaves the work to it.
        """
        if not self.pending():
            return Counter(), 0
        with self._replaying() as alone:
            if not alone:
                return Counter(), 0
            with self._locked():
                lines = list(self._lines())
            tally: Counter[str] = Counter()
            done: set[bytes] = set()
            for line in lines:
                verdict = "untried" if tally["unreachable"] else apply(line)
                tally[verdict] += 1
                if verdict in ("applied", "superseded"):
                    done.add(line)
            with self._locked():
                remaining = [line for line in self._lines() if line not in done]
                if done:  # else unchanged: a line kept for good leaves its mark as it is
                    self._rewrite(remaining)
        return tally, len(remaining)

    def _lines(self) -> Iterator[bytes]:
        try:
            with self.path.open("rb") as file:
                yield from (line for line in file if line.strip())
        except FileNotFoundError:
            return

    def _read(self) -> Iterator[JournalEntry]:
        for line in self._lines():
            yield JournalEntry.from_line(line)

    def _rewrite(self, lines: list[bytes]) -> None:
        """Replace the journal atomically: a crash leaves either the old or the new file."""
        temporary = self.path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, b"".join(lines))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        temporary.replace(self.path)
        _fsync_directory(self.path.parent)

    @contextmanager
    def _replaying(self) -> Iterator[bool]:
        """Whether this caller is the one replay of the host (a non-blocking file lock)."""
        private_directory(self.path.parent)
        descriptor = os.open(self._replay_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(descriptor)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        private_directory(self.path.parent)
        descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)


def _apply(store: CredentialStore, line: bytes, restored_over: list[tuple[str, State]]) -> str:
    """Replay one line: applied, superseded, unreadable, refused or unreachable.

    A pair restored over a record in another state than active is added to ``restored_over``.
    A kept grant is left for :meth:`Journal.store_kept`.
    """
    if _is_kept_grant(line):
        return "kept"
    try:
        entry = JournalEntry.from_line(line)
        credential_id = CredentialId.parse(entry.credential_id)
    except (ValueError, KeyError, TypeError):
        return "unreadable"
    try:
        write = Write(credential_id, entry.expected_version, entry.record, entry.due)
        swap = store.swap(write, release=entry.held_lock())
    except (RedisConnectionError, RedisTimeoutError):
        return "unreachable"
    except RedisError as error:
        log.warning(
            "journal: Redis refused the pair of %s (%s); kept for the next replay",
            entry.credential_id,
            redis_errors.describe(error),
        )
        return "refused"
    if swap.found is not None:
        log.warning(
            "journal: pair of %s dropped, the credential changed since "
            "(reconnected, deleted or already restored)",
            entry.credential_id,
        )
        return "superseded"
    replaced = swap.replaced
    if replaced in (None, State.ACTIVE):
        log.warning("journal: rotated pair of %s restored", entry.credential_id)
    else:
        restored_over.append((entry.credential_id, replaced))
        log.warning(
            "journal: rotated pair of %s restored over its %s state (set by a process that "
            "tried the refresh token Miro had consumed, or the state its rotation began in)",
            entry.credential_id,
            replaced.value,
        )
    return "applied"


def _is_kept_grant(line: bytes) -> bool:
    try:
        data = json.loads(line)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("kind") == KeptGrant.KIND


def _store_kept(store: Callable[[KeptGrant], bool], line: bytes) -> str:
    """Hand one kept grant to ``store``: applied, waiting, unreadable, refused or unreachable."""
    if not _is_kept_grant(line):
        return "other"
    try:
        grant = KeptGrant.from_json(json.loads(line))
    except (ValueError, KeyError, TypeError):
        return "unreadable"
    try:
        return "applied" if store(grant) else "waiting"
    except (RedisConnectionError, RedisTimeoutError):
        return "unreachable"
    except RedisError as error:
        log.warning("journal: Redis refused a kept grant (%s)", redis_errors.describe(error))
        return "refused"


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
