"""The bytes of one credential in Redis: a JSON header, a newline, raw Fernet ciphertext.

The header holds what the scheduler and the Lua scripts need (version, state, expiries) in
plain text so they never decrypt anything; the ciphertext holds the two tokens. Ids are not
repeated: they are the key.

Schema 2, written now, keeps a record near 290 bytes so that, with its key, it fits
jemalloc's 320-byte size class (schema 1's 339 bytes took the 384-byte one): the header
leaves out every field that holds its default (``lr`` when it equals ``ca``), and the tokens
are encrypted as the access token, a newline and the refresh token (if any) instead of a
JSON object, one AES block less. Schema 1 records (tokens as ``{"a":..,"r":..}``) are still
read, and written for a pair with a newline inside a token; changing a header or
re-encrypting keeps a record's schema, since its ciphertext still holds that schema's tokens.
A header field this version does not know (a later version's optional one) is ignored when
read and dropped when this version writes the header again: optional fields must default to
what their absence means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from worker.credential import Credential, CredentialId, State, describe
from worker.crypto import TokenCipher
from worker.secret import Secret

SCHEMA = 2
SEPARATOR = b"\n"
_SCHEMAS = (1, SCHEMA)

# Header field names (short on purpose: they are repeated in every record).
_FIELDS = {
    "version": "v",
    "state": "st",
    "access_expires_at": "ae",
    "refresh_expires_at": "re",
    "scope": "sc",
    "token_type": "tt",
    "created_at": "ca",
    "last_refresh_at": "lr",
    "last_error": "le",
    "failure_count": "fc",
    "refusals": "rf",
    "successes_at_refusal": "sr",
}

#: What a field left out of a header stands for; ``v`` and ``st`` are never left out, and
#: ``lr`` left out means ``ca`` in schema 2 (a grant is stored when it is refreshed).
_DEFAULTS: dict[str, Any] = {
    "ae": None,
    "re": None,
    "sc": "",
    "tt": "bearer",
    "ca": 0,
    "lr": None,
    "le": None,
    "fc": 0,
    "rf": 0,
    "sr": None,
}
#: Never equal to a field's value, so a field without a default is always written.
_REQUIRED = object()

_STATES = frozenset(state.value for state in State)
_HEADER_JSON = json.JSONEncoder(separators=(",", ":")).encode


class CorruptRecordError(ValueError):
    """The stored bytes are not a record this version understands."""


@dataclass(frozen=True)
class RawRecord:
    """A record split in its two parts, without decrypting anything."""

    header: dict[str, Any]
    ciphertext: bytes

    @classmethod
    def parse(cls, data: bytes) -> RawRecord:
        head, sep, ciphertext = data.partition(SEPARATOR)
        if not sep or not ciphertext:
            raise CorruptRecordError("record has no ciphertext part (truncated or not a record)")
        try:
            header = json.loads(head)
        except (ValueError, RecursionError):
            raise CorruptRecordError("record header is not JSON") from None
        if not isinstance(header, dict):
            raise CorruptRecordError("record header is not a JSON object")
        schema = header.get("s")
        if type(schema) is not int or schema not in _SCHEMAS:
            raise CorruptRecordError(
                f"record schema {schema!r} is not one of {_SCHEMAS}; it was written by "
                "another version"
            )
        version, state = header.get("v"), header.get("st")
        if type(version) is not int or not isinstance(state, str) or state not in _STATES:
            raise CorruptRecordError("record header lacks a valid version or state")
        return cls(header, ciphertext)

    @property
    def schema(self) -> int:
        return int(self.header["s"])

    @property
    def version(self) -> int:
        return int(self.header["v"])

    @property
    def state(self) -> State:
        return State(self.header["st"])

    def with_ciphertext(self, ciphertext: bytes) -> bytes:
        """These bytes with the tokens re-encrypted and the header untouched."""
        return _join(self.header, ciphertext)

    def with_header(self, **changes: Any) -> bytes:
        """These bytes with some header fields changed and the ciphertext (and schema) kept.

        The header is written again from all its fields, so a change of ``created_at`` keeps
        a ``last_refresh_at`` that was left out because it equalled the old one.
        """
        unknown = changes.keys() - _FIELDS.keys()
        if unknown:
            raise KeyError(f"not header fields: {sorted(unknown)}")
        fields = {**header_fields(self), **changes}
        return _join(_header(self.schema, fields), self.ciphertext)


def _default(schema: int, short: str, fields: dict[str, Any]) -> Any:
    """What ``short`` stands for when a header of ``schema`` leaves it out."""
    if short == "lr" and schema >= 2:
        return fields["created_at"]
    return _DEFAULTS.get(short, _REQUIRED)


def _header(schema: int, fields: dict[str, Any]) -> dict[str, Any]:
    """The header of ``fields`` (long names) in ``schema``, defaults left out."""
    header: dict[str, Any] = {"s": schema}
    for name, short in _FIELDS.items():
        value = fields[name]
        if value != _default(schema, short, fields):
            header[short] = value
    return header


def _join(header: dict[str, Any], ciphertext: bytes) -> bytes:
    return _HEADER_JSON(header).encode() + SEPARATOR + ciphertext


def _sealed(credential: Credential) -> tuple[int, bytes]:
    """The schema a credential's tokens are written in, and their plaintext.

    Schema 2 joins them with a newline. A token holding one (no OAuth token does: they travel
    in HTTP headers) could not be told apart that way, so that pair is written in schema 1's
    JSON instead: a pair Miro has just issued must be stored, whatever it looks like.
    """
    access = credential.access_token.reveal()
    refresh = credential.refresh_token.reveal() if credential.refresh_token else None
    if "\n" in access or (refresh is not None and "\n" in refresh):
        return 1, json.dumps({"a": access, "r": refresh}, separators=(",", ":")).encode()
    return SCHEMA, (access if refresh is None else f"{access}\n{refresh}").encode()


def encode(credential: Credential, cipher: TokenCipher) -> bytes:
    """The record bytes of a credential, its tokens encrypted under the first key."""
    schema, plaintext = _sealed(credential)
    return _join(_header(schema, vars(credential)), cipher.encrypt(plaintext))


def header_fields(raw: RawRecord) -> dict[str, Any]:
    """The credential fields kept in the header, by their long names, defaults filled in."""
    fields: dict[str, Any] = {}
    for name, short in _FIELDS.items():
        value = raw.header.get(short, _REQUIRED)
        fields[name] = _default(raw.schema, short, fields) if value is _REQUIRED else value
    fields["state"] = raw.state
    return fields


def describe_record(credential_id: CredentialId, data: bytes) -> dict[str, Any]:
    """The public view of a stored credential, read from its header: no key needed."""
    return describe(credential_id, header_fields(RawRecord.parse(data)))


def _tokens(schema: int, plaintext: bytes) -> tuple[str, str | None]:
    """The access and refresh token of a decrypted plaintext of ``schema``."""
    if schema == 1:
        tokens = json.loads(plaintext)
        return tokens["a"], tokens["r"]
    access, newline, refresh = plaintext.decode().partition("\n")
    return access, refresh if newline else None


def decode(credential_id: CredentialId, data: bytes, cipher: TokenCipher) -> Credential:
    """The credential stored in ``data``.

    Raises:
        CorruptRecordError: the bytes are not a record.
        UndecryptableError: no configured key decrypts the tokens.
    """
    raw = RawRecord.parse(data)
    try:
        access, refresh = _tokens(raw.schema, cipher.decrypt(raw.ciphertext))
    except (ValueError, KeyError, TypeError):
        raise CorruptRecordError("decrypted tokens are not in the expected shape") from None
    return Credential(
        id=credential_id,
        access_token=Secret(access),
        refresh_token=Secret(refresh) if refresh is not None else None,
        **header_fields(raw),
    )
