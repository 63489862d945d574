"""A time as the CLI's text shows it: ISO 8601 in UTC, and how far it is from now.

One style wherever a person reads a time (``list``, ``status``, ``rotate``, ``doctor``): the
exact instant to match against logs, and the distance to act on at a glance. The ``--json``
outputs keep epoch seconds, which scripts compare and compute with.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from humanize import naturaldelta


def human_time(at: float, now: float) -> str:
    """``2026-05-04T09:12:00Z (in 42 minutes)``, or ``(3 hours ago)`` for a time past."""
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{stamp} ({_distance(at - now)})"


def _distance(seconds: float) -> str:
    words = naturaldelta(timedelta(seconds=abs(seconds)))
    return f"in {words}" if seconds >= 0 else f"{words} ago"
