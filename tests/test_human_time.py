"""Times as the CLI's text shows them: ISO 8601 in UTC, then how far from now."""

from __future__ import annotations

import pytest

from worker.human_time import human_time

#: 2026-05-04T09:12:00Z
NOW = 1_777_885_920


@pytest.mark.parametrize(
    ("offset", "text"),
    [
        (3000, "2026-05-04T10:02:00Z (in 50 minutes)"),
        (-7200, "2026-05-04T07:12:00Z (2 hours ago)"),
        (7 * 86400, "2026-05-11T09:12:00Z (in 7 days)"),
        (-5, "2026-05-04T09:11:55Z (5 seconds ago)"),
        (0.4, "2026-05-04T09:12:00Z (in a moment)"),
    ],
)
def test_a_time_is_its_utc_instant_and_its_distance_from_now(offset: float, text: str) -> None:
    assert human_time(NOW + offset, NOW) == text
