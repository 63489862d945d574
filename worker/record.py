"""The bytes of one credential in Redis: a JSON header, a newline, raw Fernet ciphertext.

The header holds what the scheduler and the Lua scripts need (version, state, expiries) in
plain text so they never decrypt anything; the ciphertext holds the two tokens. Ids are not
repeated: they are the key. Short field names keep a record near 330 bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from worker.credential import Credential, CredentialId, State, describe
from worker.crypto import TokenCipher
from worker.secret import Secret

SCHEMA = 1
SEPARATOR = b"\n"

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
}


_STATES = frozenset(state.value for state in State)


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
        if schema != SCHEMA:
            raise CorruptRecordError(
                f"record schema {schema!r} is not {SCHEMA}; it was written by another version"
            )
        version, state = header.get("v"), header.get("st")
        if type(version) is not int or not isinstance(state, str) or state not in _STATES:
            raise CorruptRecordError("record header lacks a valid version or state")
        return cls(header, ciphertext)

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
        """These bytes with some header fields changed and the ciphertext untouched."""
        header = dict(self.header)
        for name, value in changes.items():
            _put(header, _FIELDS[name], value)
        return _join(header, self.ciphertext)


#: Fields left out of the header while they hold their default, to keep records small.
_OMITTED_DEFAULTS = {"le": None, "fc": 0, "rf": 0}


def _put(header: dict[str, Any], short: str, value: Any) -> None:
    if value is None or (short in _OMITTED_DEFAULTS and value == _OMITTED_DEFAULTS[short]):
        header.pop(short, None)
    else:
        header[short] = value.value if isinstance(value, State) else value


def _join(header: dict[str, Any], ciphertext: bytes) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + SEPARATOR + ciphertext


def encode(credential: Credential, cipher: TokenCipher) -> bytes:
    """The record bytes of a credential, its tokens encrypted under the first key."""
    plaintext = json.dumps(
        {
            "a": credential.access_token.reveal(),
            "r": credential.refresh_token.reveal() if credential.refresh_token else None,
        },
        separators=(",", ":"),
    ).encode()
    header: dict[str, Any] = {"s": SCHEMA}
    for name, short in _FIELDS.items():
        _put(header, short, getattr(credential, name))
    return _join(header, cipher.encrypt(plaintext))


def header_fields(raw: RawRecord) -> dict[str, Any]:
    """The credential fields kept in the header, by their long names, defaults filled in."""
    fields = {name: raw.header.get(short) for name, short in _FIELDS.items()}
    fields["state"] = raw.state
    fields["scope"] = fields["scope"] or ""
    fields["token_type"] = fields["token_type"] or "bearer"
    fields["created_at"] = fields["created_at"] or 0
    fields["failure_count"] = fields["failure_count"] or 0
    fields["refusals"] = fields["refusals"] or 0
    return fields


def describe_record(credential_id: CredentialId, data: bytes) -> dict[str, Any]:
    """The public view of a stored credential, read from its header: no key needed."""
    return describe(credential_id, header_fields(RawRecord.parse(data)))


def decode(credential_id: CredentialId, data: bytes, cipher: TokenCipher) -> Credential:
    """The credential stored in ``data``.

    Raises:
        CorruptRecordError: the bytes are not a record.
        UndecryptableError: no configured key decrypts the tokens.
    """
    raw = RawRecord.parse(data)
    try:
        tokens = json.loads(cipher.decrypt(raw.ciphertext))
        access, refresh = tokens["a"], tokens["r"]
    except (ValueError, KeyError, TypeError):
        raise CorruptRecordError("decrypted tokens are not in the expected shape") from None
    return Credential(
        id=credential_id,
        access_token=Secret(access),
        refresh_token=Secret(refresh) if refresh is not None else None,
        **header_fields(raw),
    )
