"""The performance suite works: its cheapest part at tiny sizes, and the batch import it uses.

``python -m bench`` takes minutes; here its store-growth benchmark (seeding, memory, scan cost
with real service processes), its console benchmark and its import benchmark run at a few
thousand credentials, so CI proves the benchmark code and its report, not the figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import throughput
from bench.__main__ import main
from bench.profile import TINY
from worker.importer import ImportRefused
from worker.sandbox import Sandbox
from worker.store import CredentialStore
from worker.vault import Vault


def test_the_store_growth_benchmark_runs_at_tiny_sizes_and_reports(tmp_path: Path) -> None:
    main(["--profile", "tiny", "--only", "growth", "--out", str(tmp_path)])

    document = json.loads((tmp_path / "tiny.json").read_text())
    sections = {section["name"]: section for section in document["sections"]}
    assert list(sections) == ["seeding", "memory", "scan"]
    points = sections["scan"]["data"]["points"]
    assert [point["size"] for point in points] == list(TINY.store_sizes)
    for point in points:
        assert set(point["service_due"]["claimed"]) == {TINY.due}
        assert set(point["service_idle"]["claimed"]) == {0}
        assert point["naive_due"]["due"] == TINY.due
        assert point["naive_idle"]["due"] == 0
    assert all(s["per_credential"] > 0 for s in sections["memory"]["data"]["samples"])
    assert sections["seeding"]["checks"][0]["value"] > 0
    assert (tmp_path / "scan_cost.png").stat().st_size > 10_000


def test_the_console_benchmark_runs_at_tiny_sizes_and_reports(tmp_path: Path) -> None:
    main(["--profile", "tiny", "--only", "console", "--out", str(tmp_path)])

    document = json.loads((tmp_path / "tiny.json").read_text())
    [section] = document["sections"]
    points = section["data"]["points"]
    assert [point["size"] for point in points] == list(TINY.store_sizes)
    for point in points:
        assert point["index_bytes"] > 0 and point["reindex_s"] > 0
        assert all(timing["max_ms"] > 0 for timing in point["requests"].values())
    assert section["checks"][0]["unit"] == "ms"  # a figure, not a timed assertion


def test_the_import_benchmark_runs_at_tiny_sizes_and_reports(tmp_path: Path) -> None:
    main(["--profile", "tiny", "--only", "import", "--out", str(tmp_path)])

    document = json.loads((tmp_path / "tiny.json").read_text())
    [section] = document["sections"]
    ratio, peak = section["checks"]
    assert ratio["unit"] == "x" and ratio["value"] > 0  # a figure, not a timed assertion
    assert 10 < peak["value"] < 500  # MB
    assert [run["seconds"] > 0 for run in section["data"]["commands"]] == [True] * TINY.import_pairs


def test_the_target_point_stands_for_its_run_of_median_rate() -> None:
    runs = [{"rate": 300.0, "cpu_ms": 2.6}, {"rate": 360.0, "cpu_ms": 2.2}, {"rate": 320.0}]
    assert throughput.median_run(runs) is runs[2]
    assert throughput.median_run(runs[:2]) is runs[1]
    assert throughput.median_run(runs[:1]) is runs[0]


def test_import_many_stores_like_import_response_one_by_one(vault: Vault, sandbox: Sandbox) -> None:
    responses = sandbox.create_grants(5)
    first = vault.import_response(responses[0])

    stored = vault.import_many([*responses, responses[1]], batch=2)

    assert [c.version for c in stored] == [first.version + 1, 1, 1, 1, 1, 2]
    for credential in stored:
        loaded = vault.store.load(credential.id)
        assert loaded.refresh_token == credential.refresh_token
        assert vault.store.due_at(credential.id) is not None
    assert vault.store.load(stored[1].id).version == 2  # the repeat won, as it came last


def test_import_many_stores_nothing_when_one_response_is_bad(
    vault: Vault, sandbox: Sandbox
) -> None:
    good = sandbox.create_grants(2)

    with pytest.raises(ImportRefused):
        vault.import_many([*good, {**good[0], "team_id": None}])

    assert list(vault.store.ids()) == []


def test_put_many_of_nothing_sends_nothing(vault: Vault) -> None:
    store: CredentialStore = vault.store
    assert store.put_many([]) == []
