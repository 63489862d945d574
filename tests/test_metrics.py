"""``GET /metrics``: Prometheus' own parser reads it, and it says what ``status --json`` says."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_cli
from tests.test_capacity import report
from worker import capacity
from worker.sandbox import Sandbox
from worker.vault import Vault
from worker.web.app import create_app

#: Seconds the soonest expiries may move between the scrape and the CLI's own reading.
CLOCK_SLACK = 10


def _scrape(vault: Vault) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of ``/metrics``, by sample name, then by its labels."""
    response = create_app(vault).test_client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def _status(env: dict[str, str]) -> dict[str, Any]:
    result = run_cli(env, "status", "--json")
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def _by_label(samples: dict[tuple[tuple[str, str], ...], float], label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for labels, value in samples.items()}


def test_metrics_match_the_status_command(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    credentials = [vault.import_response(grant) for grant in sandbox.create_grants(3)]
    assert vault.rotate_now(credentials[0].id).outcome == "rotated"
    refused = credentials[1].id
    sandbox.revoke_grant(refused.team_id, refused.user_id)
    assert vault.rotate_now(refused).outcome == "needs_reauth"

    metrics = _scrape(vault)
    status = _status(env)

    by_state = _by_label(metrics["mtk_credentials"], "state")
    assert {state: count for state, count in by_state.items() if count} == status["by_state"]
    assert status["by_state"] == {"active": 2, "needs_reauth": 1}
    assert sum(by_state.values()) == status["credentials"]
    outcomes = _by_label(metrics["mtk_refreshes_total"], "outcome")
    assert {name: count for name, count in outcomes.items() if count} == status[
        "refreshes_by_outcome"
    ]
    assert outcomes["rotated"] == 1 and outcomes["needs_reauth"] == 1
    assert metrics["mtk_credentials_overdue"][()] == status["overdue"]
    assert metrics["mtk_paused"][()] == bool(status["paused"])
    assert metrics["mtk_journal_pending"][()] == status["journal_pending"]
    for name, key in [
        ("mtk_soonest_access_expiry_seconds", "soonest_access_expiry_in"),
        ("mtk_soonest_refresh_expiry_seconds", "soonest_refresh_expiry_in"),
    ]:
        assert status[key] > 0
        assert metrics[name][()] == pytest.approx(status[key], abs=CLOCK_SLACK)


def test_with_nothing_stored_the_expiries_have_no_sample(env: dict[str, str], vault: Vault) -> None:
    metrics = _scrape(vault)
    status = _status(env)

    assert status["soonest_access_expiry_in"] is None
    assert "mtk_soonest_access_expiry_seconds" not in metrics
    assert "mtk_soonest_refresh_expiry_seconds" not in metrics
    assert set(_by_label(metrics["mtk_credentials"], "state").values()) == {0}


def test_capacity_gauges_match_the_status_command(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    vault.import_many(sandbox.create_grants(200))
    capacity.publish(vault.redis, report("w1@a", token_rate=40.0, capacity=300.0))
    capacity.publish(vault.redis, report("w2@b", refresh_seconds=None, capacity=6.4))

    metrics = _scrape(vault)
    figures = _status(env)["capacity"]

    assert figures["workers"] == 2 and figures["worker_capacity"] == pytest.approx(306.4)
    for name, key in [
        ("mtk_refresh_rate_needed", "needed"),
        ("mtk_token_rate_limit", "token_rate"),
        ("mtk_worker_capacity", "worker_capacity"),
        ("mtk_worker_throughput", "worker_throughput"),
        ("mtk_workers", "workers"),
    ]:
        assert metrics[name][()] == pytest.approx(figures[key]), name
    assert metrics["mtk_token_rate_limit"][()] == 40.0
