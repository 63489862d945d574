"""The waits between tries of a Redis call: short first, doubling, never past the deadline."""

from __future__ import annotations

import time

from worker.backoff import FIRST_WAIT, Backoff


def test_the_waits_double_and_stop_at_the_deadline() -> None:
    started = time.monotonic()
    backoff = Backoff(0.3)

    while backoff.wait():
        pass

    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.0  # 0.05 + 0.1, then the 0.15 left of a 0.2 wait
    assert 2 <= backoff.waits <= 3
    assert not backoff.wait()  # and stays over


def test_no_time_means_no_wait() -> None:
    backoff = Backoff(0)
    started = time.monotonic()
    assert not backoff.wait()
    assert time.monotonic() - started < FIRST_WAIT
    assert backoff.waits == 0
