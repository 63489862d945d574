"""The console's pages over a real Redis: every credential once, in order, whatever moves
between two pages, at a cost that does not grow with the store.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest
import redis
from cryptography.fernet import Fernet

from worker.constants import DUE_INDEX, FAILING
from worker.credential import Credential, CredentialId, InvalidCredentialId, State
from worker.crypto import TokenCipher
from worker.listing import CursorError, Listing, Page, View
from worker.secret import Secret
from worker.store import CredentialStore

TEAM = "3074457358607431473"
NOW = 1_760_000_000.0


@pytest.fixture
def store(redis_client: redis.Redis) -> CredentialStore:
    return CredentialStore(redis_client, TokenCipher.from_text(Fernet.generate_key().decode()))


def _credential(team_id: str, user_id: str, state: State = State.ACTIVE) -> Credential:
    return Credential(
        id=CredentialId(team_id, user_id),
        access_token=Secret(secrets.token_urlsafe(30)),
        refresh_token=Secret(secrets.token_urlsafe(30)),
        access_expires_at=int(NOW) + 3599,
        refresh_expires_at=int(NOW) + 5_184_000,
        state=state,
    )


def _stored(store: CredentialStore, teams: int, users: int, due: float = NOW) -> list[str]:
    """``teams`` teams of ``users`` users each, due one second apart; their ids."""
    entries = [
        (_credential(str(3074457300000000000 + team), str(3458764500000000000 + user)), due + i)
        for i, (team, user) in enumerate((t, u) for t in range(teams) for u in range(users))
    ]
    for start in range(0, len(entries), 1000):
        store.put_many(entries[start : start + 1000])
    return [str(credential.id) for credential, _ in entries]


def _pages(next_page: Callable[[str], Page]) -> Iterator[Page]:
    cursor = ""
    while True:
        page = next_page(cursor)
        yield page
        if page.next is None:
            return
        cursor = page.next


def _ids(pages: Iterator[Page]) -> list[str]:
    return [row["id"] for page in pages for row in page.rows]


def test_the_due_view_lists_every_scheduled_credential_once_soonest_first(
    store: CredentialStore,
) -> None:
    stored = _stored(store, teams=7, users=9)
    listing = Listing(store, size=10)

    pages = list(_pages(lambda cursor: listing.page(View.DUE, cursor)))

    assert [len(page.rows) for page in pages] == [10] * 6 + [3]
    assert _ids(iter(pages)) == stored


def test_the_failing_view_lists_the_latest_failure_first(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    stored = _stored(store, teams=1, users=12)
    for when, credential_id in enumerate(stored):
        redis_client.zadd(FAILING, {credential_id: NOW + when})
    listing = Listing(store, size=5)

    assert _ids(_pages(lambda cursor: listing.page(View.FAILING, cursor))) == stored[::-1]


def test_the_all_view_lists_every_credential_once_scheduled_or_not(
    store: CredentialStore,
) -> None:
    stored = _stored(store, teams=10, users=30)
    store.put_many([(_credential("99", "1", State.NEEDS_REAUTH), None)])  # off the schedule
    listing = Listing(store, size=17)

    listed = _ids(_pages(lambda cursor: listing.page(View.ALL, cursor)))

    assert sorted(listed) == sorted([*stored, "99:1"])


def test_a_row_that_moves_between_two_pages_shifts_no_other_row(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    stored = _stored(store, teams=1, users=30)
    listing = Listing(store, size=10)
    first = listing.page(View.DUE)
    assert first.next is not None
    last_shown = first.rows[-1]["id"]
    redis_client.zadd(DUE_INDEX, {last_shown: NOW + 3600})  # rotated: due in an hour

    rest = _ids(_pages(lambda cursor: listing.page(View.DUE, cursor or first.next or "")))

    assert rest == [*stored[10:], last_shown]


def test_ties_of_due_time_are_paged_through_even_when_the_cursors_row_moved(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    """A scan's claim gives thousands the same due time (the lease's end)."""
    stored = sorted(_stored(store, teams=1, users=25))
    redis_client.zadd(DUE_INDEX, dict.fromkeys(stored, NOW))
    listing = Listing(store, size=10)
    first = listing.page(View.DUE)
    assert first.next is not None
    redis_client.zadd(DUE_INDEX, {first.rows[-1]["id"]: NOW + 3600})

    rest = _ids(_pages(lambda cursor: listing.page(View.DUE, cursor or first.next or "")))

    assert [row["id"] for row in first.rows] == stored[:10]
    assert rest == [*stored[10:], stored[9]]


def test_search_pages_through_a_large_team_and_then_the_user_id(store: CredentialStore) -> None:
    """A team past 512 users is no intset: SSCAN answers it a few members at a time."""
    team = "3074457300000000000"
    stored = _stored(store, teams=1, users=600)
    same_number_as_user = [(_credential("1", team), None)]  # a user whose id is the team's
    store.put_many(same_number_as_user)
    listing = Listing(store, size=50)

    pages = list(_pages(lambda cursor: listing.search(team, cursor)))

    listed = _ids(iter(pages))
    assert len(listed) == len(set(listed)) == 601
    assert sorted(listed[:600]) == sorted(stored) and listed[600] == f"1:{team}"
    assert all(len(page.rows) == 50 for page in pages[:-1])


def test_search_of_a_user_in_many_teams_pages_through_them(store: CredentialStore) -> None:
    user = "3458764513820540928"
    teams = sorted(str(3074457300000000000 + team) for team in range(23))
    store.put_many([(_credential(team, user), None) for team in teams])
    listing = Listing(store, size=10)

    assert _ids(_pages(lambda cursor: listing.search(user, cursor))) == [
        f"{team}:{user}" for team in teams
    ]


@pytest.mark.parametrize("query", ["", "1 OR 1=1", "team:", "a*", "x" * 65])
def test_a_search_for_what_is_no_id_is_refused(store: CredentialStore, query: str) -> None:
    with pytest.raises(InvalidCredentialId):
        Listing(store).search(query)


@pytest.mark.parametrize(
    ("view", "cursor"),
    [
        (View.DUE, "soon~1:2"),
        (View.DUE, "nan~1:2"),
        (View.DUE, "12.5"),
        (View.ALL, "70000~1:2"),
        (View.ALL, "-1~1:2"),
    ],
)
def test_a_cursor_the_listing_did_not_make_is_refused(
    store: CredentialStore, view: View, cursor: str
) -> None:
    with pytest.raises(CursorError):
        Listing(store).page(view, cursor)


@pytest.mark.parametrize("cursor", ["user~5:1", "team~x~1", "elsewhere~1"])
def test_a_search_cursor_the_listing_did_not_make_is_refused(
    store: CredentialStore, cursor: str
) -> None:
    with pytest.raises(CursorError):
        Listing(store).search("1", cursor)


def _commands(redis_client: redis.Redis) -> int:
    """Commands Redis has run, those of scripts included (INFO's own call left out)."""
    stats = redis_client.info("commandstats")
    return sum(int(stat["calls"]) for name, stat in stats.items() if name != "cmdstat_info")


def _cost(redis_client: redis.Redis, read: Callable[[], object]) -> int:
    before = _commands(redis_client)
    read()
    return _commands(redis_client) - before - 1  # INFO counts itself once it has run


READS: dict[str, Callable[[Listing], object]] = {
    "due, first page": lambda listing: listing.page(View.DUE),
    "due, a later page": lambda listing: listing.page(View.DUE, f"{NOW + 700!r}~x:y"),
    "failing": lambda listing: listing.page(View.FAILING),
    "all, first page": lambda listing: listing.page(View.ALL),
    "all, a later page": lambda listing: listing.page(View.ALL, "30000~x:y"),
    "search by team": lambda listing: listing.search("3074457300000000003"),
    "search by user": lambda listing: listing.search("3458764500000000003"),
}


def test_a_page_costs_the_same_commands_in_a_store_ten_times_larger(
    store: CredentialStore, redis_client: redis.Redis
) -> None:
    listing = Listing(store)

    def costs() -> dict[str, int]:
        return {
            name: _cost(redis_client, lambda r=read: r(listing)) for name, read in READS.items()
        }

    _stored(store, teams=10, users=100)
    small = costs()
    _stored(store, teams=100, users=100, due=NOW + 0.5)
    large = costs()

    assert {name: large[name] <= small[name] for name in READS} == dict.fromkeys(READS, True)
    assert max(small.values()) <= 60
