"""The credential store: records and the due index in Redis, changed only atomically.

Every write of a record goes through a compare-and-swap (``scripts/write_if_version.lua``)
that also moves the credential in the due index (and puts a new one in the id index), so a
record and its schedule never disagree and a rotation never overwrites a newer pair.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from itertools import islice
from typing import Any, NamedTuple, TypeVar

from redis import Redis
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.exceptions import ConnectionError as Unreachable
from redis.exceptions import TimeoutError as NoReply

from worker import replies, scripts
from worker.backoff import Backoff
from worker.constants import (
    CREDENTIAL_KEY_PREFIX,
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
from worker.idindex import IdKeys
from worker.lock import Flight, call_handing_over
from worker.record import (
    CorruptRecordError,
    RawRecord,
    decode,
    describe_record,
    encode,
)
from worker.replies import optional_data

log = logging.getLogger(__name__)

#: ``expected`` for a record that must not exist yet.
ABSENT = ""
#: ``expected`` for a record whose bytes cannot be parsed.
CORRUPT = "corrupt"
#: What ``write_if_version`` answers for a record it refused to write.
REFUSED = 0
#: Records :meth:`CredentialStore.describe` reads per round trip.
DESCRIBE_BATCH = 500
Answer = TypeVar("Answer")


class Write(NamedTuple):
    """One compare-and-swap: ``data`` and ``due`` if the stored version is ``expected``."""

    credential_id: CredentialId
    expected: str
    data: bytes
    due: float | None


class Swap(NamedTuple):
    """What one compare-and-swap did, as the script saw it."""

    #: None when written (now, or by this very write sent before); else the version found.
    found: str | None
    #: The state of the record written over, read in the same atomic step as the write: None
    #: for none or an unreadable one, and for a write that had landed before (sent again
    #: after a lost reply), whose first try alone saw what it wrote over.
    replaced: State | None = None


class Put(NamedTuple):
    """A credential as :meth:`CredentialStore.put_many` stored it, and the state it replaced."""

    credential: Credential
    replaced: State | None


class NotFoundError(LookupError):
    """No credential is stored under this id."""

    def __init__(self, credential_id: CredentialId) -> None:
        super().__init__(f"no credential {credential_id} is stored; see `python -m worker list`")


class CredentialStore:
    """Reads and writes credential records; knows nothing about Miro or schedules."""

    def __init__(self, redis: Redis, cipher: TokenCipher, resend_seconds: float = 0.0) -> None:
        """A store on ``redis``.

        Args:
            redis: the client.
            cipher: the keys that encrypt the tokens.
            resend_seconds: how long :meth:`put_many` sends a call again while Redis is
                unreachable or its reply is lost (``COMMIT_RETRY_SECONDS``).
        """
        self.redis = redis
        self.cipher = cipher
        self.resend_seconds = resend_seconds
        self._write_if_version = redis.register_script(scripts.source("write_if_version"))
        self._replace_if_equal = redis.register_script(scripts.source("replace_if_equal"))
        self._delete = redis.register_script(scripts.source("delete"))

    def raw(self, credential_id: CredentialId) -> bytes | None:
        return optional_data(self.redis.get(credential_key(str(credential_id))))

    def load(self, credential_id: CredentialId) -> Credential:
        """The stored credential, decrypted.

        Raises:
            NotFoundError: nothing is stored under this id.
            CorruptRecordError: the record cannot be parsed.
            UndecryptableError: no configured key decrypts it.
        """
        data = self.raw(credential_id)
        if data is None:
            raise NotFoundError(credential_id)
        return decode(credential_id, data, self.cipher)

    def write(
        self,
        credential_id: CredentialId,
        expected: str,
        data: bytes,
        due: float | None,
        *,
        release: Flight | None = None,
    ) -> bool:
        """Write ``data`` and its due time if the stored version is still ``expected``.

        Args:
            credential_id: whose record.
            expected: the version read before (a number, ABSENT or CORRUPT).
            data: the new record.
            due: when it is next due; None takes it off the schedule.
            release: a rotation's lock, let go of in the same step, written or not.
        """
        write = Write(credential_id, expected, data, due)
        return self.swap(write, release=release).found is None

    def swap(self, write: Write, *, release: Flight | None = None) -> Swap:
        """:meth:`write`, telling also the state it wrote over (for a recovery notice)."""
        return self._compare_and_swap([write], release)[0]

    def _compare_and_swap(
        self, writes: Sequence[Write], release: Flight | None = None, *, answer_key: str = ""
    ) -> list[Swap]:
        """One ``write_if_version`` call for all ``writes``, applied in order.

        Args:
            writes: the compare-and-swaps, in order.
            release: a rotation's lock, let go of in the same step.
            answer_key: where the script keeps its answer for this call sent again (see
                :meth:`put_many`); "" for a call that needs none.

        Returns:
            For each write, what it did; a version found is the script's own reading of
            it: a number, ABSENT or CORRUPT.
        """
        keys = [
            DUE_INDEX,
            STATE_COUNTS,
            FAILING,
            release.key if release else "",
            answer_key,
            ID_BUCKETS_USED,
            ID_INDEX_COMPLETE,
        ]
        args: list[Any] = [int(time.time()), release.owner if release else ""]
        for credential_id, expected, data, due in writes:
            name = str(credential_id)
            indexed = IdKeys.of(credential_id)
            keys += (credential_key(name), indexed.team_set, indexed.user_bucket)
            due_text = "" if due is None else repr(float(due))
            args += (expected, data, due_text, name, indexed.bucket)
        # A rotation's commit also takes the next credential's lock, if it was given one.
        found = call_handing_over(self.redis, self._write_if_version, keys, args, release)
        if release:
            release.released = True
            if not found.pop():
                expired = release.credential_id
                log.warning("refresh lock of %s had expired before its commit", expired)
        return [_swap(code, detail.decode()) for code, detail in found]

    def save(self, credential: Credential, expected_version: int, due: float | None) -> bool:
        """Compare-and-swap a whole credential (tokens and header) against a version."""
        return self.write(
            credential.id, str(expected_version), encode(credential, self.cipher), due
        )

    def put_many(
        self,
        entries: Sequence[tuple[Credential, float | None]],
        *,
        read_first: bool = False,
        skip_stored: dict[CredentialId, str] | None = None,
    ) -> list[Put | None]:
        """Store new grants whatever is there, each bumping the version past the stored one.

        Used for new grants (a code exchange, an import, a user reconnecting): the bump makes
        any rotation still running on the old pair fail its compare-and-swap. A batch (an
        import) costs one script call, and no read unless asked.

        Each entry is written as a new user's (version 1), or with ``read_first`` past the
        version read. A record that is not what the entry expects refuses the write and names
        its version, and the refused entries go again past it, in one more call, their tokens
        not encrypted again. An entry repeating an id of the batch goes in the call after the
        one that stores the entry before it. The outcome is that of storing the entries one
        by one, in order. A batch of new users thus costs one round trip and one fsync: a
        read before each batch made every importer wait a second time behind the others'
        writes (bench/: seeding).

        A call is sent again while Redis is unreachable or its reply is lost, for up to
        ``resend_seconds`` (a restart, a dropped connection). Its answer is kept for minutes
        under a name of its own, and a call sent again gets that answer back: a record it
        stored and a worker rotated before the resend is not refused and stored again, with
        the refresh token the rotation used.

        Args:
            entries: the credentials and their due times.
            read_first: read the stored versions first (one MGET), for a batch of users
                mostly stored already (a re-import), whose blind writes would all be refused.
                Not with ``skip_stored``, whose refusals cost no second call.
            skip_stored: given, leave the users stored before this import as they are (an
                import run again after it failed part way: their pairs may have been rotated
                since). It is the import's own account of the users it stored, by version,
                kept from one call to the next (an import's batches are calls of their own),
                so that a user's repeats still replace each other, in order: ``{}`` for its
                first call.

        Returns:
            For each entry, the credential as stored and the state of the record it replaced
            (see :class:`Swap`); None for an entry skipped (``skip_stored``).

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis stayed away ``resend_seconds``;
                the calls answered before stay applied.
        """
        puts: dict[int, Put] = {}
        skipped: set[CredentialId] = set()
        # Each id's version as last read, written, or named by a refusal.
        known: dict[CredentialId, str] = {}
        if skip_stored is not None:
            known = skip_stored
        elif read_first:
            known = self._resent(partial(self._stored_versions, entries))
        records: list[bytes | None] = [None] * len(entries)
        pending = list(range(len(entries)))
        while pending:
            tries = self._tries(entries, pending, known, records)
            call = partial(
                self._compare_and_swap,
                [write for _, _, write in tries],
                answer_key=answer_key(secrets.token_hex(8)),
            )
            for (index, stored, _), swap in zip(tries, self._resent(call), strict=True):
                if swap.found is None:
                    puts[index] = Put(stored, swap.replaced)
                    known[stored.id] = str(stored.version)
                elif skip_stored is not None and stored.id not in known:  # stored before
                    skipped.add(stored.id)
                else:  # not the version expected (or an odd record): again, past the one named
                    known[stored.id] = swap.found
            pending = [
                index
                for index in pending
                if index not in puts and entries[index][0].id not in skipped
            ]
        return [puts.get(index) for index in range(len(entries))]

    def _resent(self, call: Callable[[], Answer]) -> Answer:
        """``call()``, made again while Redis is unreachable or its reply is lost.

        Made again for up to ``resend_seconds``, then the error is raised (a refused login at
        once). Only for a call that may run twice: a read, or a write whose answer is kept
        (see write_if_version.lua), which is thus applied once however often it is sent.
        """
        backoff = Backoff(self.resend_seconds)
        while True:
            try:
                return call()
            except (AuthenticationError, AuthorizationError):
                raise
            except (Unreachable, NoReply) as error:
                if not backoff.wait():
                    raise
                if backoff.waits == 1:
                    log.warning(
                        "storing new grants: %s; sending again for up to %g s",
                        type(error).__name__,
                        self.resend_seconds,
                    )

    def _stored_versions(
        self, entries: Sequence[tuple[Credential, float | None]]
    ) -> dict[CredentialId, str]:
        """The stored version of each entry's id as the script reads it (see :func:`_version`)."""
        ids = [credential.id for credential, _ in entries]
        if not ids:
            return {}
        records = self.redis.mget([credential_key(str(credential_id)) for credential_id in ids])
        return {
            credential_id: _version(optional_data(data))
            for credential_id, data in zip(ids, records, strict=True)
        }

    def _tries(
        self,
        entries: Sequence[tuple[Credential, float | None]],
        pending: list[int],
        known: dict[CredentialId, str],
        records: list[bytes | None],
    ) -> list[tuple[int, Credential, Write]]:
        """The next call's writes: the first pending entry of each id, past its known version.

        Each record made is kept in ``records``, so a refused entry's tokens are encrypted
        once.
        """
        tries: list[tuple[int, Credential, Write]] = []
        tried: set[CredentialId] = set()
        for index in pending:
            credential, due = entries[index]
            if credential.id in tried:
                continue
            tried.add(credential.id)
            expected = known.get(credential.id, ABSENT)
            stored = _bumped(credential, expected)
            records[index] = data = self._record(stored, records[index])
            tries.append((index, stored, Write(stored.id, expected, data, due)))
        return tries

    def _record(self, credential: Credential, refused: bytes | None) -> bytes:
        """The record of ``credential``: a refused try's with the new version, or a new one."""
        if refused is None:
            return encode(credential, self.cipher)
        return RawRecord.parse(refused).with_header(version=credential.version)

    def replace_if_equal(self, credential_id: CredentialId, old: bytes, new: bytes) -> bool:
        return bool(
            self._replace_if_equal(keys=[credential_key(str(credential_id))], args=[old, new])
        )

    def delete(self, credential_id: CredentialId) -> bool:
        """Remove a credential, its schedule and its place in the id index; true if it existed."""
        name = str(credential_id)
        indexed = IdKeys.of(credential_id)
        keys = [
            credential_key(name),
            DUE_INDEX,
            STATE_COUNTS,
            FAILING,
            indexed.team_set,
            indexed.user_bucket,
            ID_BUCKETS_USED,
        ]
        return bool(self._delete(keys=keys, args=[name, indexed.bucket]))

    def schedule(self, credential_id: CredentialId, when: float) -> None:
        """Move a credential in the due index without touching its record."""
        self.redis.zadd(DUE_INDEX, {str(credential_id): when})

    def due_at(self, credential_id: CredentialId) -> float | None:
        return self.redis.zscore(DUE_INDEX, str(credential_id))

    def describe(self, ids: Iterable[CredentialId]) -> Iterator[dict[str, Any]]:
        """The public view of each stored credential, read from its header: no key needed.

        Read ``DESCRIBE_BATCH`` records per round trip; ids with no record are left out.
        """
        remaining = iter(ids)
        while chunk := list(islice(remaining, DESCRIBE_BATCH)):
            records = self.redis.mget([credential_key(str(each)) for each in chunk])
            for credential_id, data in zip(chunk, records, strict=True):
                if data is not None:
                    yield _described(credential_id, replies.data(data))

    def ids(self, team_id: str | None = None) -> Iterator[CredentialId]:
        """Every stored id (or one team's), by SCAN: for operator commands, never per tick."""
        pattern = credential_key(f"{team_id}:*" if team_id else "*")
        for key in self.redis.scan_iter(match=pattern, count=1000):
            yield CredentialId.parse(key.decode()[len(CREDENTIAL_KEY_PREFIX) :])


def _described(credential_id: CredentialId, data: bytes) -> dict[str, Any]:
    try:
        return describe_record(credential_id, data)
    except CorruptRecordError as error:
        return {"id": str(credential_id), "state": "corrupt", "last_error": str(error)}


def _swap(code: int, detail: str) -> Swap:
    """A write's answer from the script: its code, and the version found or state replaced."""
    if code == REFUSED:
        return Swap(found=detail)
    try:
        return Swap(found=None, replaced=State(detail) if detail else None)
    except ValueError:  # a header's state this version does not know: as unreadable
        return Swap(found=None)


def _version(data: bytes | None) -> str:
    """A stored record's version as ``write_if_version`` reads it: a number, ABSENT or CORRUPT.

    Only the version: the state a write replaces is read by the script, in the write's step.
    """
    if data is None:
        return ABSENT
    try:
        return str(RawRecord.parse(data).version)
    except CorruptRecordError:
        return CORRUPT


def _bumped(credential: Credential, expected: str) -> Credential:
    """The credential with a version past the stored one, so older rotations lose their CAS.

    A new user's credential already has version 1 and is returned as it is: an import of a
    million new users then builds no second copy of each.
    """
    version = (int(expected) if expected.isdigit() else 0) + 1
    return credential if credential.version == version else replace(credential, version=version)
