"""Bulk import: many token responses stored at once, all or nothing, over several processes.

Responses are read as a stream (see :class:`ResponseFile`), never held all at once. A first
pass checks every response and spools the grants it makes; only once all have passed does a
second pass store them from the spool, ``BATCH`` per call of the store's compare-and-swap
(:meth:`CredentialStore.put_many`), without reading or checking the responses again.

With ``jobs`` processes, forked, each reads all the responses and keeps its share of the
users: a user's repeats are all stored by one process, in order, and no process stores before
every share has passed its check. Reading a response is cheap; sending it to another process
would cost as much, and the processes would wait on a reader.

The spools are unnamed temporary files in DATA_DIR (0600), gone when closed or when the
process dies; they hold the grants' tokens as the responses did. Standard input is spooled to
such a file first, since every process reads it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol, TypeVar

from settings import Settings
from worker.bulk import fork_map
from worker.credential import Credential, CredentialId
from worker.datadir import private_directory
from worker.jsonstream import JsonStream, NotJSON
from worker.miro import TokenGrant
from worker.secret import Secret
from worker.store import Put

#: Responses stored per call of the compare-and-swap script.
BATCH = 1000
#: What the command line calls standard input.
STDIN = "-"

Result = TypeVar("Result")
#: A checked grant as a spool keeps it: the fields of a TokenGrant (tokens revealed), then
#: those of its credential's id.
Packed = tuple[Any, ...]


class BadResponse(ValueError):
    """A token response that cannot be stored; the message says why, without its tokens."""


class ImportRefused(ValueError):
    """Nothing was stored: a response, or the file, is not one the import can store."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        #: How many responses come before the one refused (or before the fault in the file).
        self.position = position

    def __reduce__(self) -> tuple[type, tuple[int, str]]:
        return type(self), (self.position, str(self))


class Keeper(Protocol):
    """What the import needs of the vault: the rules of a new grant, and its storing."""

    settings: Settings

    def named_grant(self, body: Any) -> tuple[TokenGrant, CredentialId]:
        """The grant a token response makes and its credential's id; :class:`BadResponse`."""

    def new_credential(self, grant: TokenGrant, credential_id: CredentialId) -> Credential:
        """The credential a checked grant makes."""

    def store_new(
        self,
        credentials: list[Credential],
        *,
        read_first: bool = False,
        skip_stored: dict[CredentialId, str] | None = None,
    ) -> list[Put | None]:
        """Store new grants as :meth:`CredentialStore.put_many` does, telling who came back."""


@dataclass(frozen=True)
class Imported:
    """What an import did."""

    responses: int
    stored: int

    @property
    def skipped(self) -> int:
        return self.responses - self.stored


class Share(NamedTuple):
    """One process's part of the responses: those of the users that hash to ``index``."""

    number: int
    of: int

    def holds(self, body: Any) -> bool:
        """Whether a response is this share's, read before it is checked.

        A response that is no object goes to the first share, whose check reports it.
        """
        if self.of == 1:
            return True
        if not isinstance(body, dict):
            return self.number == 0
        user = f"{body.get('team_id')}:{body.get('user_id')}"
        return zlib.crc32(user.encode()) % self.of == self.number


class Checked(NamedTuple):
    """A share's check: how many responses were read, and the first it refused."""

    responses: int
    refused: ImportRefused | None


def import_responses(
    keeper: Keeper,
    responses: Iterable[Any],
    *,
    jobs: int = 1,
    batch: int = BATCH,
    skip_stored: bool = False,
    on_stored: Callable[[list[Credential]], object] | None = None,
) -> Imported:
    """Check every response, then store them all, in ``jobs`` forked processes.

    Each response is stored as the vault stores one new grant (the same compare-and-swap,
    version bump and recovery notice), but a batch costs one round trip and one fsync.

    Args:
        keeper: the vault.
        responses: Miro's token responses; iterated once per pass (a list, a
            :class:`ResponseFile`), and by every process.
        jobs: processes; one per core for a migration.
        batch: responses stored per script call.
        skip_stored: leave the users already stored as they are, and out of the count: for
            an import run again after it failed part way, whose stored users' pairs may have
            been rotated since (their refresh tokens in ``responses`` spent). A user's
            repeats in ``responses`` still replace each other, in order.
        on_stored: given each batch of credentials as stored (one process only).

    Raises:
        ImportRefused: naming the first response refused (by its place among the responses,
            and its user if it names one) or what is wrong with the file; nothing was stored.
    """
    if jobs < 1:
        raise ValueError(f"an import needs at least one process, not {jobs}")
    if on_stored is not None and jobs > 1:
        raise ValueError("on_stored is for an import in one process")
    shares = [Share(index, jobs) for index in range(jobs)]
    with ExitStack() as stack:
        directory = private_directory(keeper.settings.data_dir)
        spools = [
            stack.enter_context(tempfile.TemporaryFile(dir=directory)).fileno() for _ in shares
        ]
        checks = _each_share(partial(_check, keeper, responses, spools, batch), shares)
        refusals = [check.refused for check in checks if check.refused is not None]
        if refusals:
            raise min(refusals, key=lambda refused: refused.position)
        store = partial(
            _store, keeper, spools, batch=batch, skip_stored=skip_stored, on_stored=on_stored
        )
        stored = sum(_each_share(store, shares))
    return Imported(checks[0].responses, stored)


def _each_share(work: Callable[[Share], Result], shares: list[Share]) -> list[Result]:
    """``work`` for each share: in this process for one, else in a forked process each."""
    return [work(shares[0])] if len(shares) == 1 else fork_map(work, shares)


def _check(
    keeper: Keeper, responses: Iterable[Any], spools: list[int], batch: int, share: Share
) -> Checked:
    """Read every response, checking this share's into its spool, up to the first refused."""
    read = 0
    with _SpoolWriter(spools[share.number], batch) as spool:
        try:
            for read, body in enumerate(responses, start=1):
                if share.holds(body):
                    spool.add(*_named_grant(keeper, read - 1, body))
        except BadResponse as error:
            return Checked(read, ImportRefused(read - 1, f"{error}; nothing was stored"))
        except NotJSON as error:
            return Checked(read, ImportRefused(read, f"{error}; nothing was stored"))
    return Checked(read, None)


def _store(
    keeper: Keeper,
    spools: list[int],
    share: Share,
    *,
    batch: int,
    skip_stored: bool,
    on_stored: Callable[[list[Credential]], object] | None,
) -> int:
    """Store this share's spooled grants, ``batch`` at a time; how many were stored.

    A batch is written blind, as new users (see :meth:`CredentialStore.put_many`), until one
    replaces more records than it creates: a re-import's batches then read the stored
    versions first, one MGET each, instead of being refused once per record. Skipping the
    stored users, a batch is always written blind: a refusal is all they cost; the users
    this import stored are told apart from them by the account kept of them (``ours``).
    """
    credentials = (
        keeper.new_credential(*_unpacked(packed)) for packed in _spooled(spools[share.number])
    )
    ours: dict[CredentialId, str] | None = {} if skip_stored else None
    read_first = False
    stored = 0
    while chunk := list(islice(credentials, batch)):
        puts = keeper.store_new(chunk, read_first=read_first, skip_stored=ours)
        written = [put.credential for put in puts if put is not None]
        read_first = sum(credential.version > 1 for credential in written) * 2 > len(chunk)
        stored += len(written)
        if on_stored is not None:
            on_stored(written)
    return stored


def _named_grant(keeper: Keeper, position: int, body: Any) -> tuple[TokenGrant, CredentialId]:
    """The grant of a response, or its error naming it by its place and its user."""
    try:
        return keeper.named_grant(body)
    except BadResponse as error:
        raise BadResponse(f"response {position}{_whose(body)}: {error}") from None


class _SpoolWriter:
    """Appends checked grants to a spool, ``batch`` per pickle; written through on exit."""

    def __init__(self, spool: int, batch: int) -> None:
        self._spool = spool
        self._batch = batch
        self._pending: list[Packed] = []
        self._file: IO[bytes] | None = None

    def add(self, grant: TokenGrant, credential_id: CredentialId) -> None:
        self._pending.append(_packed(grant, credential_id))
        if len(self._pending) >= self._batch:
            self._flush()

    def _flush(self) -> None:
        assert self._file is not None, "a spool is written inside its with block"
        pickle.dump(self._pending, self._file, protocol=pickle.HIGHEST_PROTOCOL)
        self._pending = []

    def __enter__(self) -> _SpoolWriter:
        self._file = open(self._spool, "wb", closefd=False)  # closed on exit
        return self

    def __exit__(self, *_: object) -> None:
        # Before a forked child ends: it leaves by os._exit, which flushes no buffer.
        self._flush()
        assert self._file is not None
        self._file.close()


def _spooled(spool: int) -> Iterator[Packed]:
    """The grants of a spool, in the order they were added."""
    os.lseek(spool, 0, os.SEEK_SET)
    with open(spool, "rb", closefd=False) as file:
        while True:
            try:
                yield from pickle.load(file)  # our own, in a file no other process can name
            except EOFError:
                return


def _packed(grant: TokenGrant, credential_id: CredentialId) -> Packed:
    refresh = grant.refresh_token.reveal() if grant.refresh_token is not None else None
    return (
        grant.access_token.reveal(),
        refresh,
        grant.expires_in,
        grant.team_id,
        grant.user_id,
        grant.scope,
        grant.token_type,
        grant.warning,
        credential_id.team_id,
        credential_id.user_id,
    )


def _unpacked(packed: Packed) -> tuple[TokenGrant, CredentialId]:
    access, refresh, expires_in, team_id, user_id, scope, token_type, warning, *named = packed
    refresh_token = Secret(refresh) if refresh is not None else None
    grant = TokenGrant(
        Secret(access), refresh_token, expires_in, team_id, user_id, scope, token_type, warning
    )
    return grant, CredentialId(*named)


def _whose(body: Any) -> str:
    """The user a token response names, for an error about it: ids only, never a token."""
    if not isinstance(body, dict):
        return ""
    named = [
        f"{name.removesuffix('_id')} {str(body[name])[:40]}"
        for name in ("team_id", "user_id")
        if isinstance(body.get(name), str | int)
    ]
    return f" ({', '.join(named)})" if named else ""


class ResponseFile:
    """The token responses of a file, read as a stream each time they are iterated.

    The file holds one response (an object), a JSON array of them, or JSON Lines.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        #: Whether the responses were a JSON array, known once they have been read.
        self.array: bool | None = None

    def __iter__(self) -> Iterator[Any]:
        try:
            with self.path.open(encoding="utf-8-sig") as text:
                stream = JsonStream(text)
                yield from stream
                self.array = stream.array
        except UnicodeDecodeError:
            raise NotJSON(f"{self.name}: not UTF-8 text, so not JSON") from None
        except NotJSON as error:
            raise NotJSON(f"{self.name}: {error}") from None


@contextmanager
def response_file(file: str, data_dir: Path) -> Iterator[ResponseFile]:
    """The responses of ``file``; ``-``: standard input, spooled to DATA_DIR meanwhile."""
    if file != STDIN:
        yield ResponseFile(Path(file), file)
        return
    with tempfile.NamedTemporaryFile(
        dir=private_directory(data_dir), prefix="import-", suffix=".json"
    ) as spool:  # 0600, and deleted on the way out
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.flush()
        yield ResponseFile(Path(spool.name), "standard input")
