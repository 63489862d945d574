"""The sandbox's memory: grants, authorization codes, token indexes and counters.

One lock guards all of it, because Miro's rules are about atomic transitions: a refresh
token is spent exactly once, and the moment it is spent the old access token dies too.
Every request is answered by dict lookups keyed by token, never by scanning grants, so a
sandbox holding 100k grants answers as fast as one holding ten. No HTTP in here.
"""

from __future__ import annotations

import itertools
import re
import secrets
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

DEFAULT_TEAM_ID = "3074457358607431473"
"""Team of grants made without a ``team_id``: like Miro's, a 19-digit id above 2^53."""

SCOPE = "boards:write boards:read"
CODE_TTL_S = 600.0
"""Miro's authorization codes expire after 10 minutes."""

_FIRST_USER_ID = 3458764513820540928
"""Users get consecutive 19-digit ids from here: unique without a collision check."""

_TOKEN_BYTES = 45
"""45 random bytes encode to 60 url-safe characters, about the length of Miro's tokens."""

_NUMERIC_ID = re.compile(r"[1-9][0-9]{0,29}")

COUNTERS: tuple[str, ...] = (
    "token_calls",
    "exchanges",
    "grants_created",
    "refreshes",
    "reused_refresh_tokens",
    "invalid_refresh_tokens",
    "stale_access_token_uses",
    "expired_access_token_uses",
    "board_calls",
    "revokes",
    "uninstalls",
    "errors_injected",
    "rate_limited",
    "hung",
    "lost",
    "orphaned",
    "reused_after_loss",
)
"""Counters reported by ``stats()``; tests assert on them to see what a client did.

``orphaned`` counts rotations done for a client that had hung up (killed or timed out), so
their new pair reached nobody; ``reused_after_loss`` counts the old refresh tokens of lost
and orphaned rotations presented again, which a client must do to find out. Every other
reuse is ``reused_refresh_tokens``: a client's bug.
"""

GAUGES: tuple[str, ...] = ("token_in_flight", "held", "hanging")
"""Gauges reported by ``stats()`` beside the counters: token calls now being served, those
of them stopped by the ``hold`` fault, and those stalled by the ``hang`` fault."""

GrantKey = tuple[str, str]
"""``(team_id, user_id)``: a credential is scoped to one user in one team."""


class InvalidGrantError(Exception):
    """The authorization code or refresh token cannot be redeemed."""


class RedirectMismatchError(Exception):
    """The ``redirect_uri`` of an exchange differs from the one used to authorize."""


class InvalidTokenError(Exception):
    """The access token is unknown, rotated away, expired or revoked."""


class Grant(NamedTuple):
    """One user's authorization of the app in one team, with its current tokens.

    Records are immutable (a tuple, which is also the cheapest record to create when
    seeding 100k grants): every change stores a new record, so a grant handed to a
    request thread can be read without the lock.
    """

    team_id: str
    user_id: str
    access_token: str
    refresh_token: str
    access_expires_at: float
    refresh_expires_at: float
    revoked: bool = False
    lost: bool = False
    rotations: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Return the grant as a JSON-ready dict, for ``/_sandbox/grants``."""
        return self._asdict()


class _PendingCode(NamedTuple):
    """An authorization code waiting to be exchanged."""

    redirect_uri: str
    team_id: str
    user_id: str
    expires_at: float


def _new_token() -> str:
    """Return a fresh, unguessable, url-safe token of about 60 characters."""
    return secrets.token_urlsafe(_TOKEN_BYTES)


def _check_id(name: str, value: str) -> str:
    """Return ``value`` if it is a decimal id, else raise ``ValueError``.

    Ids are emitted as bare JSON numbers in refresh responses, so anything else (or a
    leading zero, which a number would drop) would corrupt them.
    """
    if not _NUMERIC_ID.fullmatch(value):
        raise ValueError(f"{name} must be a decimal number without leading zeros")
    return value


class GrantStore:
    """Grants, codes and counters of one sandbox, safe to use from many threads.

    Args:
        access_ttl: Lifetime of an access token, in seconds.
        refresh_ttl: Lifetime of a refresh token from its issue, in seconds.
        clock: Source of the current time, replaceable so tests can expire tokens.
    """

    def __init__(self, access_ttl: float, refresh_ttl: float, clock: Callable[[], float]) -> None:
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._user_ids = itertools.count(_FIRST_USER_ID)
        self._grants: dict[GrantKey, Grant] = {}
        self._by_access: dict[str, GrantKey] = {}
        self._by_refresh: dict[str, GrantKey] = {}
        self._spent_refresh: set[str] = set()
        self._undelivered: set[str] = set()
        self._stale_access: set[str] = set()
        self._codes: dict[str, _PendingCode] = {}
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._gauges = dict.fromkeys(GAUGES, 0)

    def adjust(self, gauge: str, delta: int) -> None:
        """Move ``gauge`` by ``delta``."""
        with self._lock:
            self._gauges[gauge] += delta

    def count(self, counter: str) -> None:
        """Add one to ``counter``."""
        with self._lock:
            self._counters[counter] += 1

    def stats(self) -> dict[str, int]:
        """Return a copy of the counters."""
        with self._lock:
            return {**self._counters, **self._gauges}

    def issue_code(self, redirect_uri: str, team_id: str, user_id: str | None) -> str:
        """Approve an authorization and return its single-use code.

        Args:
            redirect_uri: The URI the exchange must repeat.
            team_id: The team the app is installed in.
            user_id: The approving user, or ``None`` for a new user.

        Raises:
            ValueError: If an id is not a decimal number.
        """
        _check_id("team_id", team_id)
        code = _new_token()
        now = self._clock()
        with self._lock:
            self._drop_expired_codes(now)
            user = _check_id("user_id", user_id) if user_id else self._next_user_id()
            self._codes[code] = _PendingCode(redirect_uri, team_id, user, now + CODE_TTL_S)
        return code

    def exchange(self, code: str, redirect_uri: str) -> Grant:
        """Redeem an authorization code for a new grant.

        A mismatched ``redirect_uri`` leaves the code unspent, so a corrected request can
        still succeed; any other failure is final.

        Raises:
            InvalidGrantError: The code is unknown, already used or expired.
            RedirectMismatchError: ``redirect_uri`` differs from the authorization's.
        """
        now = self._clock()
        with self._lock:
            pending = self._codes.get(code)
            if pending is None or now >= pending.expires_at:
                self._codes.pop(code, None)
                raise InvalidGrantError
            if pending.redirect_uri != redirect_uri:
                raise RedirectMismatchError
            del self._codes[code]
            self._counters["exchanges"] += 1
            return self._install(pending.team_id, pending.user_id, now)

    def refresh(self, refresh_token: str, *, lost: bool = False, abandoned: bool = False) -> Grant:
        """Rotate a grant: spend its refresh token and kill its access token.

        Args:
            refresh_token: The token presented.
            lost: Mark the grant as one whose new pair the sandbox will not deliver.
            abandoned: The client hung up before this call was served (it timed out while
                the call was stuck): a refusal now reaches nobody, so a spent token here is
                a late echo of a call the client already retried, not a client bug.

        Raises:
            InvalidGrantError: The token is unknown, already spent, expired or revoked.
        """
        now = self._clock()
        with self._lock:
            key = self._by_refresh.get(refresh_token)
            if key is None:
                self._counters[self._refusal_counter(refresh_token, abandoned)] += 1
                raise InvalidGrantError
            old = self._grants[key]
            if now >= old.refresh_expires_at:
                self._counters["invalid_refresh_tokens"] += 1
                raise InvalidGrantError
            self._unindex(old)
            self._spent_refresh.add(old.refresh_token)
            self._stale_access.add(old.access_token)
            grant = self._issue(
                key[0], key[1], now, lost=old.lost or lost, rotations=old.rotations + 1
            )
            self._counters["refreshes"] += 1
            if lost:
                self._counters["lost"] += 1
                self._undelivered.add(old.refresh_token)
            return grant

    def orphan(self, spent_refresh_token: str, grant: Grant) -> None:
        """Record that ``grant``'s new pair, made from ``spent_refresh_token``, reached nobody."""
        with self._lock:
            self._counters["orphaned"] += 1
            self._undelivered.add(spent_refresh_token)
            key = (grant.team_id, grant.user_id)
            if self._grants.get(key) == grant:
                self._grants[key] = grant._replace(lost=True)

    def _refusal_counter(self, refresh_token: str, abandoned: bool) -> str:
        """Which counter a refused, unknown refresh token goes to; the caller holds the lock."""
        spent = refresh_token in self._spent_refresh
        if refresh_token in self._undelivered or (spent and abandoned):
            return "reused_after_loss"
        if spent:
            return "reused_refresh_tokens"
        return "invalid_refresh_tokens"

    def authenticate(self, access_token: str) -> Grant:
        """Return the grant an access token is current for.

        Uses of rotated-away and of expired tokens are counted apart: the first means a
        client raced its own refresh, the second that it refreshed too late.

        Raises:
            InvalidTokenError: The token is not current or has expired.
        """
        now = self._clock()
        with self._lock:
            key = self._by_access.get(access_token)
            if key is None:
                if access_token in self._stale_access:
                    self._counters["stale_access_token_uses"] += 1
                raise InvalidTokenError
            grant = self._grants[key]
            if now >= grant.access_expires_at:
                self._counters["expired_access_token_uses"] += 1
                raise InvalidTokenError
            return grant

    def holder(self, token: str) -> Grant | None:
        """Return the live grant whose current access or refresh token ``token`` is."""
        with self._lock:
            key = self._by_access.get(token) or self._by_refresh.get(token)
            return self._grants[key] if key else None

    def revoke(self, access_token: str) -> bool:
        """End the grant a current, unexpired access token belongs to.

        Returns:
            ``False`` if the access token is not a grant's current one, or has expired.
        """
        now = self._clock()
        with self._lock:
            key = self._by_access.get(access_token)
            if key is None or now >= self._grants[key].access_expires_at:
                return False
            self._revoke(key)
            self._counters["revokes"] += 1
            return True

    def revoke_grant(self, team_id: str, user_id: str) -> bool:
        """End a grant as if its user uninstalled the app.

        Returns:
            ``False`` if there is no live grant for this user in this team.
        """
        key = (team_id, user_id)
        with self._lock:
            grant = self._grants.get(key)
            if grant is None or grant.revoked:
                return False
            self._revoke(key)
            self._counters["uninstalls"] += 1
            return True

    def create_grants(self, count: int, team_id: str = DEFAULT_TEAM_ID) -> list[Grant]:
        """Create ``count`` grants for new users directly, skipping authorize and exchange.

        Raises:
            ValueError: If ``count`` is negative or ``team_id`` is not a decimal number.
        """
        if count < 0:
            raise ValueError("count must not be negative")
        _check_id("team_id", team_id)
        now = self._clock()
        with self._lock:
            created = [self._install(team_id, self._next_user_id(), now) for _ in range(count)]
            self._counters["grants_created"] += count
        return created

    def grants(self) -> list[Grant]:
        """Return every grant, revoked ones included."""
        with self._lock:
            return list(self._grants.values())

    def issued_tokens(self) -> set[str]:
        """Every access and refresh token ever issued, current or spent: what must never leak."""
        with self._lock:
            current = {
                token for g in self._grants.values() for token in (g.access_token, g.refresh_token)
            }
            return current | self._spent_refresh | self._stale_access

    def grant(self, team_id: str, user_id: str) -> Grant | None:
        """Return the grant of one user in one team, if any."""
        with self._lock:
            return self._grants.get((team_id, user_id))

    def reset(self) -> None:
        """Forget every grant, code and spent token, and zero the counters."""
        with self._lock:
            self._grants.clear()
            self._by_access.clear()
            self._by_refresh.clear()
            self._spent_refresh.clear()
            self._stale_access.clear()
            self._codes.clear()
            self._counters = dict.fromkeys(COUNTERS, 0)
            self._undelivered.clear()

    def _next_user_id(self) -> str:
        """Return an id no user of this sandbox has had."""
        return str(next(self._user_ids))

    def _install(self, team_id: str, user_id: str, now: float) -> Grant:
        """Create the grant of a user in a team, superseding an earlier one; lock held."""
        previous = self._grants.get((team_id, user_id))
        if previous is not None:
            self._unindex(previous)
        return self._issue(team_id, user_id, now, lost=False, rotations=0)

    def _issue(
        self, team_id: str, user_id: str, now: float, *, lost: bool, rotations: int
    ) -> Grant:
        """Store a live grant with a fresh token pair and fresh lifetimes; lock held."""
        grant = Grant(
            team_id,
            user_id,
            _new_token(),
            _new_token(),
            now + self._access_ttl,
            now + self._refresh_ttl,
            revoked=False,
            lost=lost,
            rotations=rotations,
        )
        key = (team_id, user_id)
        self._grants[key] = grant
        self._by_access[grant.access_token] = key
        self._by_refresh[grant.refresh_token] = key
        return grant

    def _revoke(self, key: GrantKey) -> None:
        """Mark a grant revoked and make both its tokens unknown; lock held."""
        grant = self._grants[key]
        self._unindex(grant)
        self._grants[key] = grant._replace(revoked=True)

    def _unindex(self, grant: Grant) -> None:
        """Stop the grant's current tokens from being found; lock held."""
        self._by_access.pop(grant.access_token, None)
        self._by_refresh.pop(grant.refresh_token, None)

    def _drop_expired_codes(self, now: float) -> None:
        """Forget codes that expired unused; lock held.

        Codes are stored in issue order, so the expired ones are at the front.
        """
        while self._codes:
            code, pending = next(iter(self._codes.items()))
            if now < pending.expires_at:
                return
            del self._codes[code]
