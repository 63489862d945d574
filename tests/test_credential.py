"""Credential ids: whatever arrives, an id either stays inside its key prefix or is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.constants import CREDENTIAL_KEY_PREFIX, credential_key
from worker.credential import CredentialId, InvalidCredentialId

GLOB_AND_SEPARATORS = set("*?[]\\:/ \n\r\t\x00{}")


@given(st.text(max_size=200))
def test_any_text_parses_to_a_safe_id_or_is_refused(text: str) -> None:
    try:
        credential_id = CredentialId.parse(text)
    except InvalidCredentialId as error:
        assert "credential id" in str(error) or "_id" in str(error)
        return
    key = credential_key(str(credential_id))
    assert key.startswith(CREDENTIAL_KEY_PREFIX)
    for part in (credential_id.team_id, credential_id.user_id):
        assert not GLOB_AND_SEPARATORS & set(part)
        assert 1 <= len(part) <= 64
    assert CredentialId.parse(str(credential_id)) == credential_id


@given(st.one_of(st.integers(), st.text(max_size=80), st.floats(), st.booleans(), st.none()))
def test_id_parts_from_json_are_strings_or_exact_integers(value: object) -> None:
    try:
        credential_id = CredentialId.of(value, "1")
    except InvalidCredentialId:
        assert not isinstance(value, int) or isinstance(value, bool) or value < 0
        return
    assert isinstance(value, int | str) and not isinstance(value, bool)
    assert credential_id.team_id == str(value)  # a big int keeps every digit


@pytest.mark.parametrize(
    "text",
    ["1:2:3", "*:*", "1:", ":2", "1:2*", "../../etc:passwd", "1 :2", "x" * 65 + ":1", "1\n:2"],
)
def test_escaping_shapes_are_refused(text: str) -> None:
    with pytest.raises(InvalidCredentialId):
        CredentialId.parse(text)


def test_a_team_id_above_two_to_the_53_keeps_every_digit() -> None:
    assert CredentialId.of(3074457358607431473, 9).team_id == "3074457358607431473"
