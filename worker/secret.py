"""A wrapper that keeps tokens out of logs, reprs, tracebacks and task payloads."""

from __future__ import annotations


class Secret:
    """A string that prints as ``***``; call :meth:`reveal` at the one place it must go out.

    Tokens travel through dataclasses, exceptions and log calls; wrapping them makes an
    accidental ``%r`` or f-string harmless instead of a leak.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("a Secret must not be pickled or sent to a broker")
