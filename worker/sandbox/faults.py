"""Faults the Miro sandbox can inject, and the seeded draws that decide when they fire.

A token keeper earns its keep when Miro misbehaves: slow answers, 5xx, 429, hung
connections, answers lost after the refresh token was already rotated, a revoked app
secret. The sandbox reproduces each of these on demand so tests and benchmarks can show
that no credential is lost to them.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from dataclasses import dataclass
from typing import Any, Literal

LoseMode = Literal["mixed", "502", "drop"]

_LOSE_MODES: frozenset[str] = frozenset({"mixed", "502", "drop"})
_FRACTIONS = ("error_rate", "rate_limit_rate", "hang_rate", "lose_rate")
_DURATIONS = ("latency_ms", "rate_limit_reset_s", "hang_s")
_FLAGS = (
    "reject_all_refresh",
    "deny_authorize",
    "hold",
    "echo_tokens",
    "omit_ids",
    "token_info_fails",
)


@dataclass(frozen=True)
class Faults:
    """The faults in force; all off by default.

    Rates are fractions of calls (0..1) and apply to ``POST /v1/oauth/token`` only, except
    ``latency_ms``, which slows every Miro endpoint, and ``deny_authorize``, which is for
    ``GET /oauth/authorize``.

    Attributes:
        latency_ms: Delay added before any Miro endpoint does its work, like a far-away
            region.
        error_rate: Fraction of token calls answered 500 before anything happens.
        rate_limit_rate: Fraction of token calls answered 429 with rate-limit headers.
        rate_limit_reset_s: Seconds until the advertised rate-limit window resets.
        hang_rate: Fraction of token calls that stall ``hang_s`` seconds and then answer
            normally; the client's timeout fires first, so it cannot know the outcome.
        hang_s: How long a hung call stalls.
        lose_rate: Fraction of refresh calls that rotate the grant and then fail to deliver
            the new pair, the worst case for a client: the old refresh token is spent.
        lose_mode: How a lost answer fails: ``"502"`` (an HTML gateway page), ``"drop"``
            (the connection closes without an answer) or ``"mixed"`` (either, at random).
        reject_all_refresh: Answer every refresh as a wrong client secret, as after the
            app's secret was revoked; nothing rotates.
        deny_authorize: Redirect every authorization back with ``error=access_denied``.
        hold: Stop every token call before it does anything until ``hold`` is turned off,
            so a test can freeze clients in the middle of their calls (and kill them).
        echo_tokens: Quote, in every error of the token, token-info and revoke endpoints,
            the secrets the call carried and both tokens of the grant they name, in the
            message and in a ``context`` field, as a careless server's error might: the
            client must keep none of them.
        omit_ids: Answer code exchanges without ``user_id`` and ``team_id``, as Miro's
            refresh answers come (its guide's exchange example has them; nothing promises it).
        token_info_fails: Answer every ``GET /v1/oauth-token`` with a 500.
        seed: Seed for the draws, so a run with the same calls fires the same faults.
    """

    latency_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    rate_limit_reset_s: float = 2.0
    hang_rate: float = 0.0
    hang_s: float = 30.0
    lose_rate: float = 0.0
    lose_mode: LoseMode = "mixed"
    reject_all_refresh: bool = False
    deny_authorize: bool = False
    hold: bool = False
    echo_tokens: bool = False
    omit_ids: bool = False
    token_info_fails: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        """Reject settings that cannot be applied, so a typo fails loudly at set time."""
        for name in _FRACTIONS:
            value = _number(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        for name in _DURATIONS:
            if _number(name, getattr(self, name)) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false")
        if self.lose_mode not in _LOSE_MODES:
            raise ValueError(f"lose_mode must be one of {sorted(_LOSE_MODES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | None):
            raise TypeError("seed must be an integer or null")

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict, for ``/_sandbox/faults``."""
        return dataclasses.asdict(self)


def _number(name: str, value: object) -> float:
    """Return ``value`` as a float, refusing booleans and strings that JSON may carry."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number")
    return float(value)


class FaultInjector:
    """The faults in force plus the random source that draws them; safe across threads.

    Request threads read ``current`` once per request and draw against that snapshot, so
    a change made mid-request never mixes old and new settings.
    """

    def __init__(self, faults: Faults) -> None:
        self._lock = threading.Lock()
        self._faults = faults
        self._rng = random.Random(faults.seed)

    @property
    def current(self) -> Faults:
        """The faults in force now."""
        return self._faults

    def update(self, **fields: Any) -> Faults:
        """Change some fields and return the new faults.

        Raises:
            TypeError: For an unknown field or a value of the wrong type.
            ValueError: For a value out of range.
        """
        unknown = sorted(set(fields) - {field.name for field in dataclasses.fields(Faults)})
        if unknown:
            raise TypeError(f"unknown fault field(s): {', '.join(unknown)}")
        with self._lock:
            updated = dataclasses.replace(self._faults, **fields)
            self._install(updated, reseed="seed" in fields)
        return updated

    def replace(self, faults: Faults) -> None:
        """Put ``faults`` in force and restart the draws from its seed."""
        with self._lock:
            self._install(faults, reseed=True)

    def draw(self, rate: float) -> bool:
        """Decide whether a fault with this rate fires on this call.

        A rate of 0 consumes no randomness, so turning one fault on does not shift the
        seeded sequence of another.
        """
        if rate <= 0.0:
            return False
        with self._lock:
            return self._rng.random() < rate

    def _install(self, faults: Faults, *, reseed: bool) -> None:
        """Swap in ``faults``; the caller holds the lock."""
        self._faults = faults
        if reseed:
            self._rng.seed(faults.seed)
