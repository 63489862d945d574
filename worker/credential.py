"""A credential: one Miro user in one team, with its token pair and its bookkeeping."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from worker.secret import Secret

_ID_PART = re.compile(r"[A-Za-z0-9_-]{1,64}")


class InvalidCredentialId(ValueError):
    """An id that is not ``<team_id>:<user_id>`` of plain id characters."""


class State(StrEnum):
    ACTIVE = "active"
    #: Miro rejected the refresh token: the user must connect again.
    NEEDS_REAUTH = "needs_reauth"
    #: Disconnected on purpose; kept only until it is deleted.
    REVOKED = "revoked"
    #: No configured key decrypts the record; it is left intact until the key is back.
    UNDECRYPTABLE = "undecryptable"


@dataclass(frozen=True, order=True)
class CredentialId:
    """``<team_id>:<user_id>``. Both are strings: Miro's ids exceed a float's 2^53."""

    team_id: str
    user_id: str

    @classmethod
    def parse(cls, text: str) -> CredentialId:
        """Parse and check an id so it can never escape its Redis key prefix.

        Raises:
            InvalidCredentialId: the id has another shape or characters outside
                ``[A-Za-z0-9_-]``.
        """
        team_id, sep, user_id = text.partition(":")
        if not sep:
            raise InvalidCredentialId(
                f"credential id {text[:80]!r} must look like <team_id>:<user_id>"
            )
        return cls.of(team_id, user_id)

    @classmethod
    def of(cls, team_id: object, user_id: object) -> CredentialId:
        team, user = _id_part(team_id, "team_id"), _id_part(user_id, "user_id")
        return cls(team, user)

    def __str__(self) -> str:
        return f"{self.team_id}:{self.user_id}"


def _id_part(value: object, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidCredentialId(f"{name} must be a string or an integer, not {type(value)}")
    text = str(value)
    if not _ID_PART.fullmatch(text):
        raise InvalidCredentialId(
            f"{name} {text[:80]!r} must be 1 to 64 characters of letters, digits, _ or -"
        )
    return text


@dataclass(frozen=True)
class Credential:
    """What the store keeps for one credential. Times are epoch seconds."""

    id: CredentialId
    access_token: Secret
    refresh_token: Secret | None
    access_expires_at: int | None
    refresh_expires_at: int | None
    scope: str = ""
    token_type: str = "bearer"
    #: Bumped whenever the token pair changes, and only then: the compare-and-swap of a
    #: rotation checks it, so metadata writes never make a rotation fail.
    version: int = 1
    state: State = State.ACTIVE
    created_at: int = 0
    last_refresh_at: int | None = None
    last_error: str | None = None
    failure_count: int = 0
    #: Refusals of the refresh token in a row; the first is confirmed before giving up.
    refusals: int = 0
    #: The app's count of successes at the first of those refusals: one more since, and the
    #: app is known to work, so the refusals are the grant's (see rotation.py).
    successes_at_refusal: int | None = None

    @property
    def expires(self) -> bool:
        """Whether the credential needs refreshing at all (non-expiring tokens do not)."""
        return self.refresh_token is not None and self.access_expires_at is not None

    def public(self) -> dict[str, object]:
        """Everything but the tokens, for listings, JSON output and task results."""
        return describe(self.id, {name: getattr(self, name) for name in PUBLIC_FIELDS})


#: The fields of a credential that are not secret, in the order listings show them.
PUBLIC_FIELDS = (
    "state",
    "version",
    "scope",
    "token_type",
    "access_expires_at",
    "refresh_expires_at",
    "created_at",
    "last_refresh_at",
    "last_error",
    "failure_count",
)


def describe(credential_id: CredentialId, fields: dict[str, object]) -> dict[str, object]:
    """The public view of a credential: its id parts and its non-secret fields."""
    view: dict[str, object] = {
        "id": str(credential_id),
        "team_id": credential_id.team_id,
        "user_id": credential_id.user_id,
    }
    for name in PUBLIC_FIELDS:
        value = fields.get(name)
        view[name] = value.value if isinstance(value, State) else value
    return view
