"""A worker's measure of its refresh time, and what it reports from it."""

from __future__ import annotations

import math
import threading

import pytest

from worker.meter import MEMORY, RefreshMeter


def _meter() -> RefreshMeter:
    return RefreshMeter("w1@host", threads=64, floor_seconds=10.0, token_rate=50.0)


def test_before_any_refresh_a_worker_is_counted_at_its_floor() -> None:
    report = _meter().report(5.0)

    assert report.refresh_seconds is None and not report.measured
    assert report.capacity == pytest.approx(64 / 10.0)
    assert report.throughput == 0
    assert report.token_rate == 50.0 and report.threads == 64 and report.name == "w1@host"


def test_capacity_is_threads_over_the_mean_time_of_a_credential() -> None:
    meter = _meter()
    meter.record(3.2, 16)  # a task of 16 credentials
    meter.record(0.2, 1)  # a forced rotation

    report = meter.report(5.0)

    assert report.refresh_seconds == pytest.approx(3.4 / 17)
    assert report.capacity == pytest.approx(64 / (3.4 / 17))
    assert report.throughput == pytest.approx(17 / 5.0)


def test_older_measures_fade_and_an_idle_spell_keeps_the_last() -> None:
    meter = _meter()
    meter.record(1.0, 1)
    meter.report(5.0)
    meter.record(0.1, 1)

    after = meter.report(MEMORY)
    idle = meter.report(10 * MEMORY)

    fading = math.exp(-1)
    assert after.refresh_seconds == pytest.approx((fading * 1.0 + 0.1) / (fading + 1))
    assert idle.refresh_seconds == after.refresh_seconds
    assert idle.throughput == 0


def test_records_from_many_threads_are_all_counted() -> None:
    meter = _meter()

    def work() -> None:
        for _ in range(1000):
            meter.record(0.001, 1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    report = meter.report(1.0)
    assert report.throughput == pytest.approx(8000)
    assert report.refresh_seconds == pytest.approx(0.001)
