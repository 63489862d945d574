"""Record bytes: a plain header without secrets or ids, encrypted tokens, strict parsing."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import replace

import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker.credential import Credential, CredentialId, State
from worker.crypto import TokenCipher, UndecryptableError
from worker.record import (
    CorruptRecordError,
    RawRecord,
    decode,
    describe_record,
    encode,
)
from worker.secret import Secret

CREDENTIAL_ID = CredentialId("3074457358607431473", "9876543210123456789")


@pytest.fixture
def cipher() -> TokenCipher:
    return TokenCipher.from_text(Fernet.generate_key().decode())


def _token() -> str:
    return secrets.token_urlsafe(45)  # 60 characters


def _credential(**changes: object) -> Credential:
    fields: dict[str, object] = {
        "id": CREDENTIAL_ID,
        "access_token": Secret(_token()),
        "refresh_token": Secret(_token()),
        "access_expires_at": 1_700_003_599,
        "refresh_expires_at": 1_705_184_000,
        "scope": "boards:read boards:write",
        "token_type": "bearer",
        "version": 7,
        "state": State.ACTIVE,
        "created_at": 1_700_000_000,
        "last_refresh_at": 1_700_000_000,
    }
    fields.update(changes)
    return Credential(**fields)  # type: ignore[arg-type]


def _header(data: bytes) -> bytes:
    return data.partition(b"\n")[0]


def test_encode_then_decode_gives_back_the_credential(cipher: TokenCipher) -> None:
    credential = _credential(last_error="HTTP 500: Miro failed", failure_count=3)
    assert decode(CREDENTIAL_ID, encode(credential, cipher), cipher) == credential


def test_a_non_expiring_credential_round_trips(cipher: TokenCipher) -> None:
    credential = _credential(refresh_token=None, access_expires_at=None, refresh_expires_at=None)
    decoded = decode(CREDENTIAL_ID, encode(credential, cipher), cipher)
    assert decoded == credential
    assert not decoded.expires


def test_the_header_holds_no_token_and_no_id(cipher: TokenCipher) -> None:
    credential = _credential()
    data = encode(credential, cipher)
    header = _header(data)

    assert json.loads(header)["v"] == 7
    for secret in (credential.access_token, credential.refresh_token):
        assert secret is not None
        assert secret.reveal().encode() not in data
    assert CREDENTIAL_ID.team_id.encode() not in header
    assert CREDENTIAL_ID.user_id.encode() not in header


def test_a_realistic_record_is_under_400_bytes(cipher: TokenCipher) -> None:
    credential = _credential(version=123, failure_count=0)
    assert len(encode(credential, cipher)) < 400


def test_decode_with_another_key_is_undecryptable(cipher: TokenCipher) -> None:
    data = encode(_credential(), cipher)
    other = TokenCipher.from_text(Fernet.generate_key().decode())
    with pytest.raises(UndecryptableError):
        decode(CREDENTIAL_ID, data, other)


def test_describe_record_needs_no_key_and_shows_no_token(cipher: TokenCipher) -> None:
    credential = _credential(state=State.NEEDS_REAUTH, last_error="refused")
    data = encode(credential, cipher)

    view = describe_record(CREDENTIAL_ID, data)

    assert view["id"] == str(CREDENTIAL_ID)
    assert view["team_id"] == CREDENTIAL_ID.team_id and view["user_id"] == CREDENTIAL_ID.user_id
    assert view["state"] == "needs_reauth"
    assert view["version"] == 7
    assert view["access_expires_at"] == 1_700_003_599
    assert view["last_error"] == "refused"
    assert credential.access_token.reveal() not in json.dumps(view)
    assert view == credential.public()


def test_with_header_changes_fields_and_keeps_the_ciphertext(cipher: TokenCipher) -> None:
    credential = _credential(failure_count=2, last_error="boom")
    raw = RawRecord.parse(encode(credential, cipher))

    changed = RawRecord.parse(
        raw.with_header(state=State.NEEDS_REAUTH, failure_count=0, last_error=None)
    )

    assert changed.ciphertext == raw.ciphertext
    assert changed.state is State.NEEDS_REAUTH
    assert "fc" not in changed.header and "le" not in changed.header  # defaults are omitted
    assert decode(CREDENTIAL_ID, raw.with_header(version=8), cipher).version == 8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"s":1,"v":1,"st":"active"}', "no ciphertext part"),
        (b'{"s":1,"v":1,"st":"active"}\n', "no ciphertext part"),
        (b'{"s":1,"v":1,"st":"act', "no ciphertext part"),
        (b"{not json\n\x80abc", "header is not JSON"),
        (b"\xff\xfe\n\x80abc", "header is not JSON"),
        (b"[1,2]\n\x80abc", "not a JSON object"),
        (b'{"s":3,"v":1,"st":"active"}\n\x80abc', r"schema 3 is not one of \(1, 2\)"),
        (b'{"s":true,"v":1,"st":"active"}\n\x80abc', "schema True is not one of"),
        (b'{"v":1,"st":"active"}\n\x80abc', "schema None is not one of"),
        (b'{"s":1,"v":1,"st":"zombie"}\n\x80abc', "valid version or state"),
        (b'{"s":1,"v":"1","st":"active"}\n\x80abc', "valid version or state"),
        (b'{"s":1,"st":"active"}\n\x80abc', "valid version or state"),
    ],
)
def test_malformed_bytes_raise_corrupt_record_with_a_clear_message(
    data: bytes, message: str
) -> None:
    with pytest.raises(CorruptRecordError, match=message):
        RawRecord.parse(data)


def test_tokens_of_the_wrong_shape_are_corrupt(cipher: TokenCipher) -> None:
    data = b'{"s":1,"v":1,"st":"active"}\n' + cipher.encrypt(b'["not", "an", "object"]')
    with pytest.raises(CorruptRecordError, match="decrypted tokens"):
        decode(CREDENTIAL_ID, data, cipher)


@hypothesis_settings(max_examples=300, database=None, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_corrupt_record(data: bytes) -> None:
    try:
        raw = RawRecord.parse(data)
    except CorruptRecordError:
        return
    assert raw.ciphertext and isinstance(raw.version, int)


_HEADER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(string.ascii_lowercase),
    st.sampled_from([state.value for state in State]),
)


@hypothesis_settings(max_examples=300, database=None, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["s", "v", "st", "ae", "fc"]), _HEADER_VALUES),
    st.binary(min_size=1, max_size=20),
)
def test_arbitrary_scalar_headers_parse_or_raise_corrupt_record(
    header: dict[str, object], ciphertext: bytes
) -> None:
    data = json.dumps(header).encode() + b"\n" + ciphertext
    try:
        raw = RawRecord.parse(data)
    except CorruptRecordError:
        return
    assert raw.state in State


@pytest.mark.parametrize("state", ["[]", "{}"])
def test_a_non_string_state_is_a_corrupt_record(state: str) -> None:
    with pytest.raises(CorruptRecordError):
        RawRecord.parse(b'{"s":1,"v":1,"st":' + state.encode() + b"}\n\x80abc")


@pytest.mark.parametrize(
    "header", [b"[" * 100_000, b'{"s":1,"v":1' + b"0" * 5000 + b',"st":"active"}']
)
def test_a_pathological_json_header_is_a_corrupt_record(header: bytes) -> None:
    with pytest.raises(CorruptRecordError):
        RawRecord.parse(header + b"\n\x80abc")


def test_a_boolean_version_is_a_corrupt_record() -> None:
    with pytest.raises(CorruptRecordError):
        RawRecord.parse(b'{"s":1,"v":true,"st":"active"}\n\x80abc')


def _schema_1(credential: Credential, cipher: TokenCipher) -> bytes:
    """The bytes the schema-1 encoder wrote: every field but None ones and zero counters."""
    header = (
        f'{{"s":1,"v":{credential.version},"st":"{credential.state}",'
        f'"ae":{credential.access_expires_at},"re":{credential.refresh_expires_at},'
        f'"sc":"{credential.scope}","tt":"{credential.token_type}",'
        f'"ca":{credential.created_at},"lr":{credential.last_refresh_at}}}'
    )
    assert credential.refresh_token is not None
    tokens = json.dumps(
        {"a": credential.access_token.reveal(), "r": credential.refresh_token.reveal()},
        separators=(",", ":"),
    )
    return header.encode() + b"\n" + cipher.encrypt(tokens.encode())


def test_schema_2_leaves_out_defaults_and_fits_the_320_byte_class(cipher: TokenCipher) -> None:
    credential = _credential()
    data = encode(credential, cipher)

    header = json.loads(_header(data))
    assert header == {
        "s": 2,
        "v": 7,
        "st": "active",
        "ae": 1_700_003_599,
        "re": 1_705_184_000,
        "sc": "boards:read boards:write",
        "ca": 1_700_000_000,
    }
    # With its key, a value of up to 314 bytes takes jemalloc's 320-byte class, not 384.
    assert len(data) <= 314
    assert len(encode(_credential(refresh_token=None), cipher)) < len(data) - 60


@pytest.mark.parametrize(
    "changes",
    [
        {"refresh_token": None, "refresh_expires_at": None},
        {"refresh_token": Secret("")},
        {"last_refresh_at": None},
        {"last_refresh_at": 1_700_000_500, "token_type": "Bearer", "scope": ""},
        {"created_at": 0, "access_expires_at": None, "state": State.REVOKED, "refusals": 1},
    ],
)
def test_schema_2_round_trips_whatever_holds_a_default(
    cipher: TokenCipher, changes: dict[str, object]
) -> None:
    credential = _credential(**changes)
    assert decode(CREDENTIAL_ID, encode(credential, cipher), cipher) == credential


def test_with_header_keeps_a_left_out_last_refresh_when_created_at_changes(
    cipher: TokenCipher,
) -> None:
    raw = RawRecord.parse(encode(_credential(), cipher))
    assert "lr" not in raw.header  # it equals "ca"

    changed = decode(CREDENTIAL_ID, raw.with_header(created_at=5), cipher)

    assert (changed.created_at, changed.last_refresh_at) == (5, 1_700_000_000)


def test_with_header_refuses_a_field_the_header_does_not_hold(cipher: TokenCipher) -> None:
    with pytest.raises(KeyError, match="access_token"):
        RawRecord.parse(encode(_credential(), cipher)).with_header(access_token="x")


@pytest.mark.parametrize("token", ["access", "refresh"])
def test_a_token_with_a_newline_is_kept_in_schema_1(cipher: TokenCipher, token: str) -> None:
    credential = _credential(**{f"{token}_token": Secret(_token() + "\n" + _token())})

    data = encode(credential, cipher)

    assert RawRecord.parse(data).schema == 1  # schema 2 could not tell where it ends
    assert decode(CREDENTIAL_ID, data, cipher) == credential


def test_a_schema_1_record_is_still_read(cipher: TokenCipher) -> None:
    credential = _credential(last_refresh_at=1_700_000_500)
    data = _schema_1(credential, cipher)

    assert decode(CREDENTIAL_ID, data, cipher) == credential
    assert describe_record(CREDENTIAL_ID, data) == credential.public()


def test_a_schema_1_record_keeps_its_schema_when_its_header_or_key_changes(
    cipher: TokenCipher,
) -> None:
    credential = _credential()
    raw = RawRecord.parse(_schema_1(credential, cipher))

    changed = raw.with_header(state=State.NEEDS_REAUTH, failure_count=2, version=8)
    rekeyed = raw.with_ciphertext(cipher.encrypt(cipher.decrypt(raw.ciphertext)))

    assert RawRecord.parse(changed).schema == RawRecord.parse(rekeyed).schema == 1
    assert decode(CREDENTIAL_ID, changed, cipher) == replace(
        credential, state=State.NEEDS_REAUTH, failure_count=2, version=8
    )
    assert decode(CREDENTIAL_ID, rekeyed, cipher) == credential
