"""A real ``celery worker`` publishes what it can do, warns of a shortfall and withdraws on stop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from soak.processes import ServiceProcesses
from tests.conftest import run_cli, wait_for
from worker.capacity import WorkerReport, read_reports
from worker.sandbox import Sandbox
from worker.vault import Vault

pytestmark = pytest.mark.slow

THREADS = 16


def _start_worker(env: dict[str, str], logs: Path, token_rate: str) -> ServiceProcesses:
    processes = ServiceProcesses({**env, "MIRO_TOKEN_RATE": token_rate}, logs)
    processes.worker(concurrency=THREADS)
    processes.wait_ready()
    return processes


def _the_report(client: redis.Redis) -> WorkerReport | None:
    reports, _ = read_reports(client)
    return reports[0] if len(reports) == 1 else None


def _status(env: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    result = run_cli(env, "status", "--json")
    return result.returncode, json.loads(result.stdout), result.stderr


def test_a_rate_limit_below_the_need_is_reported_by_status_and_the_worker(
    env: dict[str, str], sandbox: Sandbox, vault: Vault, tmp_path: Path
) -> None:
    vault.import_many(sandbox.create_grants(200))  # about 0.075 refreshes/s
    low = _start_worker(env, tmp_path / "low", token_rate="0.05")
    try:
        wait_for(lambda: _the_report(vault.redis), 15, "the worker's first report")
        code, status, stderr = _status(env)
        warned = wait_for(
            lambda: "refresh capacity short" in low.log_text("w1") and low.log_text("w1"),
            15,
            "the worker's warning",
        )
    finally:
        low.stop_all()

    assert code == 1
    assert status["capacity"]["short_of"] == ["MIRO_TOKEN_RATE"]
    assert status["capacity"]["workers"] == 1
    assert status["capacity"]["worker_capacity"] == pytest.approx(THREADS / 5)  # HTTP_TIMEOUT
    assert "MIRO_TOKEN_RATE allows 0.05/s: raise it to at least 1" in stderr
    assert "WARNING" in warned and "MIRO_TOKEN_RATE allows 0.05/s" in warned
    assert read_reports(vault.redis) == ([], [])  # withdrawn on stop

    raised = _start_worker(env, tmp_path / "raised", token_rate="1")
    try:
        wait_for(lambda: _the_report(vault.redis), 15, "the worker's first report")
        code, status, stderr = _status(env)
    finally:
        raised.stop_all()

    assert code == 0, stderr
    assert status["capacity"]["short_of"] == [] and status["capacity"]["token_rate"] == 1
    assert "refresh capacity short" not in raised.log_text("w1")


def test_the_measured_refresh_time_counts_miro_and_leaves_out_rate_limit_waits(
    env: dict[str, str], sandbox: Sandbox, vault: Vault, tmp_path: Path
) -> None:
    sandbox.set_faults(latency_ms=200)
    vault.import_many(sandbox.create_grants(20))
    # 20 rotations at once at 5/s: all but the first five queue for up to 3 s for a slot.
    worker = _start_worker(env, tmp_path / "logs", token_rate="5")
    try:
        rotated = run_cli(env, "rotate", "--all", "--wait")
        report = wait_for(
            lambda: (found := _the_report(vault.redis)) and found.measured and found,
            15,
            "a measured report",
        )
    finally:
        worker.stop_all()

    assert rotated.returncode == 0, rotated.stderr
    assert sandbox.stats()["refreshes"] == 20
    assert 0.2 <= report.refresh_seconds < 0.6
    assert report.capacity == pytest.approx(THREADS / report.refresh_seconds)
    assert report.threads == THREADS and report.token_rate == 5
