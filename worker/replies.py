"""Redis's replies as the service reads them.

redis-py types a reply as ``bytes | str``, whichever its client decodes to. The service's clients
never decode (records are bytes); these narrow a reply for the code that reads it, and accept
text too, so a caller's decoding client reads the same.
"""

from __future__ import annotations

from collections.abc import Iterable


def text(reply: bytes | str) -> str:
    """A reply that holds text: an id, a name, a reason."""
    return reply.decode() if isinstance(reply, bytes) else reply


def data(reply: bytes | str) -> bytes:
    """A reply that holds bytes: a record."""
    return reply.encode() if isinstance(reply, str) else reply


def optional_data(reply: bytes | str | None) -> bytes | None:
    """A reply that holds bytes, or nothing (a missing key)."""
    return None if reply is None else data(reply)


def texts(reply: Iterable[object]) -> list[str]:
    """A reply that lists texts (ids, names).

    Raises:
        TypeError: an item is no text, as a reply with scores would hold.
    """
    items = []
    for item in reply:
        if not isinstance(item, bytes | str):
            raise TypeError(f"a reply of texts holds a {type(item).__name__}")
        items.append(text(item))
    return items
