"""Forced rotation latency: from ``rotate ID --wait`` to the new pair being stored.

A warm worker (default concurrency) and a sandbox answering at once. The requests are timed
in a warm process doing exactly what the CLI does (``bench.probe forced``: read the version
the requester sees, queue ``tasks.refresh.rotate``, wait for its result, which the worker
sends after the commit), one after the other; beside them, a few runs of the real command
``python -m worker rotate ID --wait``, whose time includes starting Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from bench.harness import ROOT, Stack, probe, service, stack
from bench.profile import Profile
from bench.report import Check, Section, Table, percentile

MAX_P50_MS = 50.0
#: Rotations before the timed ones: the worker's threads and connections warm up.
WARMUP = 5


def run(profile: Profile) -> list[Section]:
    with stack(latency_ms=0.0) as running:
        vault = running.vault()
        count = WARMUP + profile.forced_samples + profile.cli_samples
        ids = [str(c.id) for c in vault.import_many(running.sandbox.create_grants(count))]
        with service(running) as processes:
            processes.worker()
            warm = probe(running, "forced", *ids[:WARMUP])
            timed = probe(running, "forced", *ids[WARMUP : WARMUP + profile.forced_samples])
            cli = [_cli(running, cid) for cid in ids[WARMUP + profile.forced_samples :]]
    return [_section(timed, cli, warm)]


def _cli(running: Stack, credential_id: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "worker", "rotate", credential_id, "--wait"],
        env={**os.environ, **running.env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=True,
    )
    return (time.perf_counter() - started) * 1000


def _section(timed: dict[str, Any], cli: list[float], warm: dict[str, Any]) -> Section:
    millis = timed["ms"]
    p50, p99 = percentile(millis, 0.5), percentile(millis, 0.99)
    failed = [outcome for outcome in timed["outcomes"] if outcome != "rotated"]
    check = Check(
        "forced rotation, rotate ID --wait to stored, p50 (warm, 0 ms Miro)",
        p50,
        "ms",
        f"< {MAX_P50_MS:g} ms",
        p50 is not None and p50 < MAX_P50_MS and not failed,
        f"p99 {p99:.1f} ms over {len(millis)}; the CLI command end to end (Python start "
        f"included) p50 {percentile(cli, 0.5) or 0:.0f} ms",
    )
    table = Table(
        "Forced rotation latency (ms)",
        ["path", "samples", "p50", "p99", "max", "not rotated"],
        [
            ["warm process, as the CLI does it", len(millis), p50, p99, max(millis), len(failed)],
            [
                "python -m worker rotate ID --wait",
                len(cli),
                percentile(cli, 0.5),
                percentile(cli, 0.99),
                max(cli, default=None),
                0,
            ],
        ],
    )
    return Section("forced", [check], [table], {"ms": millis, "cli_ms": cli, "warmup": warm})
