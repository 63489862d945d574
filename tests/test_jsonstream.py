"""JSON read value by value: what json.loads reads, whatever the chunks cut, or a clear error."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker import jsonstream
from worker.jsonstream import JsonStream, NotJSON

SECRET = "eyJtb2tlbiI6InNlY3JldCJ9"

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
objects = st.dictionaries(st.text(max_size=8), values, max_size=4)
layouts = st.sampled_from(["compact array", "pretty array", "lines", "one"])


def _text(items: list[Any], layout: str) -> str:
    if layout == "compact array":
        return json.dumps(items)
    if layout == "pretty array":
        return json.dumps(items, indent=2)
    if layout == "lines":
        return "".join(json.dumps(item) + "\n" for item in items)
    return json.dumps(items[0])


def _read(text: str, chunk: int = jsonstream.CHUNK) -> tuple[list[Any], bool | None]:
    stream = JsonStream(io.StringIO(text), chunk)
    return list(stream), stream.array


@hypothesis_settings(max_examples=80, database=None, deadline=None)
@given(st.lists(values, min_size=1, max_size=6), st.integers(1, 40))
def test_it_reads_an_arrays_elements(items: list[Any], chunk: int) -> None:
    for layout in ("compact array", "pretty array"):
        assert _read(_text(items, layout), chunk) == (items, True)


@hypothesis_settings(max_examples=80, database=None, deadline=None)
@given(st.lists(objects, min_size=1, max_size=6), st.integers(1, 40))
def test_it_reads_json_lines_and_one_object(items: list[Any], chunk: int) -> None:
    assert _read(_text(items, "lines"), chunk) == (items, False)
    assert _read(_text(items, "one"), chunk) == (items[:1], False)


@hypothesis_settings(max_examples=60, database=None, deadline=None)
@given(
    st.lists(st.dictionaries(st.text(max_size=5), scalars, max_size=3), min_size=1, max_size=3),
    layouts,
    st.data(),
)
def test_a_text_cut_anywhere_is_refused_or_read_as_it_stands(
    items: list[dict[str, Any]], layout: str, data: st.DataObject
) -> None:
    text = _text([{"access_token": SECRET, **item} for item in items], layout)
    for end in data.draw(st.lists(st.integers(0, len(text) - 1), min_size=1, max_size=20)):
        cut = text[:end]
        try:
            read, _ = _read(cut, 7)
        except NotJSON as error:
            assert SECRET[:8] not in str(error)
            continue
        assert layout == "lines" and read == [json.loads(line) for line in cut.splitlines()]


def test_an_empty_array_is_read_as_one() -> None:
    assert _read(" [ \n ] ") == ([], True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not JSON (empty)"),
        ("[1 2]", "not JSON (expected , or ] after an element of the array, at line 1)"),
        ("[1]\n[2]", "not JSON (nothing after the array's closing ], at line 2)"),
        ('[{"a":\n1,}]', "not JSON (Expecting property name enclosed in double quotes at line 2)"),
        ("[" * 100_000, "nested too deeply to read"),
        ("[" + "9" * 5000 + "]", "JSON this importer cannot read (Exceeds the limit"),
    ],
)
def test_errors_say_what_and_where(text: str, message: str) -> None:
    with pytest.raises(NotJSON) as raised:
        _read(text)
    assert str(raised.value).startswith(message)


def test_an_early_fault_is_refused_without_reading_the_rest() -> None:
    class Counted(io.StringIO):
        def read(self, size: int | None = -1) -> str:
            text = super().read(size)
            self.read_chars = getattr(self, "read_chars", 0) + len(text)
            return text

    stream = Counted('[{"a": 1,, "b": 2}, ' + '{"c": 3}, ' * (jsonstream.MAX_VALUE // 2) + "]")
    with pytest.raises(NotJSON, match="Expecting property name"):
        list(JsonStream(stream))
    assert stream.read_chars < jsonstream.MAX_VALUE + 2 * jsonstream.CHUNK
