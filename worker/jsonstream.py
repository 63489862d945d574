"""JSON values read one at a time from a text stream, never the whole text at once.

A stream holds either one JSON array, whose elements are read one by one, or a sequence of
values separated by whitespace: a single object, or JSON Lines. Values are decoded by the
json module's C scanner from a buffer of a few chunks, so memory does not grow with the
stream, and a value nested too deeply stops at the scanner's recursion limit (ijson's
yajl backend, no faster here, builds the path of every level instead, and a deeply nested
file exhausts memory before it fails).

The whole values a chunk holds are decoded in one call where their ends can be told without
scanning (a run: see :meth:`JsonStream._array_run`), far cheaper than a call per value;
else, and for the value a chunk cuts, one by one.

Errors never quote the text, which holds tokens: they name what was expected, and where.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TextIO

#: Characters read from the stream at a time.
CHUNK = 1 << 16
#: The longest value read: one that fails to decode over this many characters is not cut
#: short by the buffer, it is wrong (a token response is a few hundred characters).
MAX_VALUE = 1 << 20

_WHITESPACE = re.compile(r"[ \t\n\r]*")
#: What may follow a value: after anything else, a number (or a literal) may go on.
_AFTER_VALUE = frozenset(" \t\n\r,]")
_DECODER = json.JSONDecoder()
_COMMA = re.compile(r"[ \t\n\r]*,")


class NotJSON(ValueError):
    """The stream is not JSON (or not JSON this reader takes); the message says where."""


class JsonStream:
    """The values of one stream, in order; :attr:`array` tells whether they were an array's."""

    def __init__(self, stream: TextIO, chunk: int = CHUNK) -> None:
        self._stream = stream
        self._chunk = chunk
        self._text = ""
        self._at = 0
        #: The line of the stream that ``_text`` starts on.
        self._line = 1
        self._ended = False
        #: Set when the buffer holds no run, until the next chunk comes in.
        self._no_run = False
        self.array: bool | None = None

    def __iter__(self) -> Iterator[Any]:
        first = self._next_character()
        self.array = first == "["
        if not self.array:
            if not first:
                raise NotJSON("not JSON (empty)")
            while self._next_character():
                yield from self._lines_run()
                if self._next_character():
                    yield self._value()
            return
        self._at += 1
        if self._next_character() == "]":
            self._at += 1
        else:
            yield from self._elements()
        if self._next_character():
            raise self._error("nothing after the array's closing ]")

    def _elements(self) -> Iterator[Any]:
        while True:
            yield from self._array_run()
            yield self._value()
            after = self._next_character()
            self._at += 1
            if after == "]":
                return
            if after != ",":
                raise self._error("expected , or ] after an element of the array")

    def _array_run(self) -> list[Any]:
        """The whole elements ahead in the buffer, decoded in one call; [] if there are none.

        They end at the last closing brace that a comma follows, and they decode as an array
        of their own only if that comma is one between elements: one inside a string or a
        nested object leaves the text cut short there, unbalanced.
        """
        end = len(self._text)
        while not self._no_run and (end := self._text.rfind("}", self._at, end)) >= 0:
            comma = _COMMA.match(self._text, end + 1)
            if comma:
                return self._run("[" + self._text[self._at : end + 1] + "]", comma.end())
        self._no_run = True
        return []

    def _lines_run(self) -> list[Any]:
        """The whole lines ahead in the buffer, decoded in one call; [] if they are not values.

        Raw newlines are never inside a JSON string, and one between the tokens of a value,
        made a comma, leaves the text unbalanced or a comma where none may be.
        """
        end = -1 if self._no_run else self._text.rfind("\n", self._at)
        if end < 0:
            self._no_run = True
            return []
        return self._run("[" + self._text[self._at : end].replace("\n", ",") + "]", end + 1)

    def _run(self, text: str, resume: int) -> list[Any]:
        """The values of a run, reading on from ``resume``; [] if ``text`` is not JSON."""
        try:
            values: list[Any] = _DECODER.decode(text)
        except (ValueError, RecursionError):  # one by one: they tell what is wrong, and where
            self._no_run = True
            return []
        self._at = resume
        return values

    def _value(self) -> Any:
        """The value at the next character, reading on while the buffer cuts it short."""
        self._next_character()
        while True:
            try:
                value, end = _DECODER.raw_decode(self._text, self._at)
            except json.JSONDecodeError as error:
                if len(self._text) - self._at < MAX_VALUE and self._read():
                    continue
                raise NotJSON(
                    f"not JSON ({error.msg} at line {self._line_at(error.pos)})"
                ) from None
            except RecursionError:
                raise NotJSON("nested too deeply to read") from None
            except ValueError as error:  # an integer of thousands of digits
                raise NotJSON(f"JSON this importer cannot read ({error})") from None
            if _may_go_on(value, self._text, end) and self._read():
                continue  # a number cut short by the buffer
            self._at = end
            return value

    def _next_character(self) -> str:
        """The next character that is not whitespace, not consumed; "" at the end."""
        while True:
            self._at = _WHITESPACE.match(self._text, self._at).end()  # type: ignore[union-attr]
            if self._at < len(self._text):
                return self._text[self._at]
            if not self._read():
                return ""

    def _read(self) -> bool:
        """Drop what was read, append the next chunk; False at the end of the stream."""
        if self._ended:
            return False
        chunk = self._stream.read(self._chunk)
        if not chunk:
            self._ended = True
            return False
        self._line += self._text.count("\n", 0, self._at)
        self._text = self._text[self._at :] + chunk
        self._at = 0
        self._no_run = False
        return True

    def _error(self, what: str) -> NotJSON:
        return NotJSON(f"not JSON ({what}, at line {self._line_at(self._at)})")

    def _line_at(self, position: int) -> int:
        return self._line + self._text.count("\n", 0, position)


def _may_go_on(value: Any, text: str, end: int) -> bool:
    """Whether a scalar read up to ``end`` may go on past the buffer (``12`` of ``12.5``).

    Objects, arrays and strings end with a closing character of their own.
    """
    if isinstance(value, dict | list | str):
        return False
    return end == len(text) or text[end] not in _AFTER_VALUE
