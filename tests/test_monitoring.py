"""monitoring/: every alert and dashboard query names series the real ``/metrics`` exports.

The names, labels and label values in each PromQL expression are checked against what a real
web app over a real Redis renders, as Prometheus would scrape it; promtool checks the rules
and runs their unit tests, which prove each alert fires on the series it is meant for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from worker.sandbox import Sandbox
from worker.vault import Vault
from worker.web.app import create_app

MONITORING = ROOT / "monitoring"
RULES = MONITORING / "prometheus-alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
#: Grafana's variables, as a value PromQL parses.
GRAFANA_VARIABLES = {"$__rate_interval": "5m"}

#: What the issue asks the alerts to cover, by the metric each must read.
ALERTED = {
    "mtk_refreshes_total",  # newly needs_reauth, failure rate
    "mtk_credentials_overdue",
    "mtk_paused",
    "mtk_journal_pending",
    "mtk_refresh_rate_needed",
    "mtk_token_rate_limit",
    "mtk_worker_capacity",
}

#: Sample name -> label name -> the values seen.
Exported = dict[str, dict[str, set[str]]]


@pytest.fixture
def exported(sandbox: Sandbox, vault: Vault) -> Exported:
    """What ``GET /metrics`` says with a credential stored (so every gauge has a sample)."""
    vault.import_response(sandbox.create_grants(1)[0])
    response = create_app(vault).test_client().get("/metrics")
    assert response.status_code == 200
    names: Exported = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = names.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return names


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = []
    for panel in panels:
        for target in panel["targets"]:
            query = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                query = query.replace(variable, value)
            queries.append(query)
    return queries


def _selectors(expression: Any) -> Iterator[promql_parser.VectorSelector]:
    """Every series selector in a parsed expression, however deep."""
    if isinstance(expression, promql_parser.VectorSelector):
        yield expression
    for child in ("lhs", "rhs", "expr", "param", "vector_selector"):
        if getattr(expression, child, None) is not None:
            yield from _selectors(getattr(expression, child))
    for argument in getattr(expression, "args", None) or []:
        yield from _selectors(argument)


def _unknown_in(query: str, exported: Exported) -> list[str]:
    """What ``query`` names that ``/metrics`` does not export: series, labels, label values."""
    unknown = []
    selectors = list(_selectors(promql_parser.parse(query)))
    if not selectors:
        return [f"no series in {query!r}"]
    for selector in selectors:
        if selector.name not in exported:
            unknown.append(f"series {selector.name}")
            continue
        labels = exported[selector.name]
        for matcher in selector.matchers.matchers:
            values = labels.get(matcher.name)
            if values is None:
                unknown.append(f"label {selector.name}{{{matcher.name}}}")
            elif matcher.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.Re):
                wanted = matcher.value.split("|") if matcher.op is promql_parser.MatchOp.Re else []
                for value in wanted or [matcher.value]:
                    if value not in values:
                        unknown.append(f"{selector.name}{{{matcher.name}={value!r}}}")
    return unknown


def test_every_alert_reads_only_what_metrics_exports(exported: Exported) -> None:
    unknown = {rule["alert"]: _unknown_in(rule["expr"], exported) for rule in _alerts()}
    assert {alert: names for alert, names in unknown.items() if names} == {}


def test_every_dashboard_query_reads_only_what_metrics_exports(exported: Exported) -> None:
    queries = _dashboard_queries()
    assert len(queries) >= 9
    unknown = {query: _unknown_in(query, exported) for query in queries}
    assert {query: names for query, names in unknown.items() if names} == {}


def test_the_alerts_cover_what_the_issue_asks_and_say_what_to_do() -> None:
    alerts = _alerts()
    read = {
        selector.name
        for rule in alerts
        for selector in _selectors(promql_parser.parse(rule["expr"]))
    }
    assert read >= ALERTED
    for rule in alerts:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool is not installed (Debian's prometheus package; `make test` as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return promtool


@pytest.mark.parametrize(
    "command", [["check", "rules", RULES.name], ["test", "rules", "prometheus-alerts.test.yml"]]
)
def test_promtool_passes_the_rules(command: list[str]) -> None:
    result = subprocess.run(
        [_promtool(), *command],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
