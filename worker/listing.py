"""Pages of credentials for the console: by due time, failing first, all, or by an id.

Every page costs O(log N + page) in Redis, whatever N is: the due time and the failing ones
are ranges of their sorted sets, the whole list reads the id index's user buckets in turn,
and a search reads one team's set and one user bucket (:mod:`worker.idindex`). Each row
comes with its place (a cursor), and the next page starts after the last row's: credentials
created or rotated between two pages shift no row onto the wrong page, as an offset would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from itertools import islice
from typing import Any

from redis import Redis

from worker import replies, scripts
from worker.constants import (
    DUE_INDEX,
    FAILING,
    ID_BUCKETS_USED,
    team_ids_key,
    user_bucket_key,
)
from worker.credential import CredentialId
from worker.idindex import USER_BUCKETS, user_bucket
from worker.store import CredentialStore

#: Rows a page shows.
PAGE_SIZE = 50
#: Separates the parts of a cursor; no id holds it.
SEPARATOR = "~"

#: A row to be: its place (the cursor of the page after it) and its credential.
Match = tuple[str, CredentialId]


class View(StrEnum):
    #: Soonest due first: the credentials the workers rotate next.
    DUE = "due"
    #: Failing or not active, the latest first (``needs_reauth``, ``revoked``, errors).
    FAILING = "failing"
    #: Every credential, in the id index's order.
    ALL = "all"


class CursorError(ValueError):
    """A cursor this listing did not make: altered, or of another view or search."""

    def __init__(self) -> None:
        super().__init__(
            "This page's link is out of date or was altered: start again from the first page."
        )


@dataclass(frozen=True)
class Page:
    """The rows of one page (public fields only, never a token) and the cursor of the next."""

    rows: list[dict[str, Any]]
    next: str | None = None


class Listing:
    """The console's pages over one store."""

    def __init__(self, store: CredentialStore, size: int = PAGE_SIZE) -> None:
        self.store = store
        self.size = size
        self._by_score = self.redis.register_script(scripts.source("page_by_score"))
        self._of_buckets = self.redis.register_script(scripts.source("page_of_buckets"))

    @property
    def redis(self) -> Redis:
        return self.store.redis

    def page(self, view: View, cursor: str = "") -> Page:
        """The page of ``view`` after ``cursor`` ("" for the first).

        Raises:
            CursorError: the cursor is not one this view made.
        """
        if view is View.ALL:
            return self._paged(self._all(cursor))
        key, order = (DUE_INDEX, "asc") if view is View.DUE else (FAILING, "desc")
        return self._paged(self._scored(key, order, cursor))

    def search(self, query: str, cursor: str = "") -> Page:
        """The credentials of a team id and of a user id (a pasted id may be either), or one.

        ``query`` is a team id or a user id, whose credentials are listed team first, or a
        whole ``<team_id>:<user_id>``.

        Raises:
            InvalidCredentialId: ``query`` is not an id.
            CursorError: the cursor is not one this search made.
        """
        query = query.strip()
        if ":" in query:
            return Page(self._rows([CredentialId.parse(query)]))
        CredentialId.of(query, query)  # a team id and a user id obey the same rules
        phase, _, place = cursor.partition(SEPARATOR)
        if phase in ("", "team"):
            scan, _, after = place.partition(SEPARATOR)
            team = self._team(query, _scan_cursor(scan or "0"), after)
            return self._paged(_chain(team, self._user(query, "")))
        if phase == "user":
            return self._paged(self._user(query, place))
        raise CursorError

    def _paged(self, matches: Iterator[Match]) -> Page:
        taken = list(islice(matches, self.size + 1))
        shown = taken[: self.size]
        following = shown[-1][0] if len(taken) > self.size else None
        return Page(self._rows(credential_id for _, credential_id in shown), following)

    def _rows(self, ids: Iterable[CredentialId]) -> list[dict[str, Any]]:
        return list(self.store.describe(ids))

    def _scored(self, key: str, order: str, cursor: str) -> Iterator[Match]:
        """A sorted set of ids by score, after the cursor's (score, id)."""
        after_score, _, after = cursor.partition(SEPARATOR)
        if cursor and not (_finite(after_score) and after):
            raise CursorError
        reply = self._by_score(keys=[key], args=[after_score, after, self.size + 1, order])
        for member, score in _pairs(reply):
            text = member.decode()
            yield f"{float(score)!r}{SEPARATOR}{text}", CredentialId.parse(text)

    def _all(self, cursor: str) -> Iterator[Match]:
        """The user buckets in use from the cursor's on, each bucket's members in order."""
        bucket_text, _, after = cursor.partition(SEPARATOR)
        bucket = _bucket_number(bucket_text) if cursor else 0
        used = _set_bits(replies.data(self.redis.get(ID_BUCKETS_USED) or b""), bucket)
        while buckets := list(islice(used, self.size + 1)):
            start = after if buckets[0] == bucket else ""
            keys = [user_bucket_key(number) for number in buckets]
            reply = self._of_buckets(keys=keys, args=[start, self.size + 1])
            for member, place in _pairs(reply):
                number, text = buckets[int(place) - 1], member.decode()
                yield f"{number}{SEPARATOR}{text}", _flipped(text)
            bucket = -1  # the next buckets are read from their start

    def _team(self, team_id: str, scan: int, after: str) -> Iterator[Match]:
        """A team's users, from an SSCAN cursor and past the last user shown of its answer.

        SSCAN answers a small team's set (an intset) whole, a large one's some members at a
        time; each answer is listed in order.
        """
        key = team_ids_key(team_id)
        while True:
            following, batch = self.redis.sscan(key, scan, count=self.size)
            for user in sorted(replies.text(member) for member in batch):
                if user > after:
                    yield f"team{SEPARATOR}{scan}{SEPARATOR}{user}", CredentialId(team_id, user)
            if not following:
                return
            scan, after = following, ""

    def _user(self, user_id: str, after: str) -> Iterator[Match]:
        """A user's teams: one range of the user's bucket, past the last one shown."""
        own = f"{user_id}:"
        if after and not after.startswith(own):
            raise CursorError
        low = f"({after}" if after else f"[{own}"
        key = user_bucket_key(user_bucket(user_id))
        for member in self.redis.zrangebylex(key, low, f"({user_id};", 0, self.size + 1):
            text = replies.text(member)
            yield f"user{SEPARATOR}{text}", _flipped(text)


def _chain(first: Iterator[Match], then: Iterator[Match]) -> Iterator[Match]:
    yield from first
    yield from then


def _pairs(reply: list[Any]) -> Iterator[tuple[Any, Any]]:
    return zip(reply[::2], reply[1::2], strict=True)


def _flipped(member: str) -> CredentialId:
    """The credential of a user bucket's member, ``<user_id>:<team_id>``."""
    user_id, _, team_id = member.partition(":")
    return CredentialId(team_id, user_id)


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _bucket_number(text: str) -> int:
    if not text.isdigit() or int(text) >= USER_BUCKETS:
        raise CursorError
    return int(text)


def _scan_cursor(text: str) -> int:
    if not text.isdigit():
        raise CursorError
    return int(text)


def _set_bits(bitmap: bytes, start: int) -> Iterator[int]:
    """The bits set in a Redis bitmap (bit 0 is the first byte's highest), from ``start`` on."""
    for index in range(start // 8, len(bitmap)):
        byte = bitmap[index]
        if not byte:
            continue
        for offset in range(8):
            number = index * 8 + offset
            if number >= start and byte & (0x80 >> offset):
                yield number
