"""``GET /metrics``: the figures of ``python -m worker status`` in Prometheus' text format.

They come from :func:`worker.status.read_status` at each scrape, so every web process reports
the same numbers (they live in Redis, not in the process) and the page never drifts from the
CLI. Every known state and outcome is reported, zeros included, so a series does not vanish
when its count drops to nothing and alerts on it keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.capacity import Capacity
from worker.credential import State
from worker.outcomes import Outcome
from worker.status import Status

PREFIX = "mtk"


class _StatusSnapshot(Collector):
    """One status read, as metric families."""

    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status
        yield _labelled(
            GaugeMetricFamily(
                f"{PREFIX}_credentials", "Stored credentials by state.", labels=["state"]
            ),
            status.by_state,
            (state.value for state in State),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_credentials_overdue",
            "Credentials past their due time by more than a few scans.",
            value=status.overdue,
        )
        yield _optional(
            f"{PREFIX}_soonest_access_expiry_seconds",
            "Seconds until the soonest access token expiry (negative: already expired).",
            status.soonest_access_expiry_in,
        )
        yield _optional(
            f"{PREFIX}_soonest_refresh_expiry_seconds",
            "Seconds until the soonest refresh token expiry (negative: already expired).",
            status.soonest_refresh_expiry_in,
        )
        yield _labelled(
            CounterMetricFamily(f"{PREFIX}_refreshes", "Refreshes by outcome.", labels=["outcome"]),
            status.refreshes_by_outcome,
            (outcome.value for outcome in Outcome),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_paused",
            "1 while refreshing is paused by an incident.",
            value=bool(status.paused),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_journal_pending",
            "Rotated pairs waiting in the rescue journal for Redis.",
            value=status.journal_pending,
        )
        yield from _capacity(status.capacity)


def _capacity(capacity: Capacity) -> Iterator[Metric]:
    for name, documentation, value in [
        (
            "refresh_rate_needed",
            "Refreshes per second the stored credentials need under the policy.",
            capacity.needed,
        ),
        (
            "token_rate_limit",
            "MIRO_TOKEN_RATE, in calls per second, as the workers seen enforce it.",
            capacity.token_rate,
        ),
        (
            "worker_capacity",
            "Refreshes per second the workers seen recently can do, all together.",
            capacity.worker_capacity,
        ),
        (
            "worker_throughput",
            "Credentials per second the workers seen recently handled, all together.",
            capacity.worker_throughput,
        ),
        ("workers", "Workers seen recently.", capacity.workers),
    ]:
        yield GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _labelled(
    family: GaugeMetricFamily | CounterMetricFamily, counts: dict[str, int], known: Iterable[str]
) -> Metric:
    for label in sorted({*known, *counts}):
        family.add_metric([label], counts.get(label, 0))
    return family


def _optional(name: str, documentation: str, value: float | None) -> Metric:
    """A gauge with no sample while there is nothing to measure (no credential expires)."""
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], value)
    return family


def render(status: Status) -> bytes:
    """The status in the text exposition format."""
    return generate_latest(_StatusSnapshot(status))
