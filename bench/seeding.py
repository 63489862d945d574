"""Seeding speed: how fast the store takes credentials in through the import path.

``import_responses`` with ``jobs`` (``import --jobs N``: one process per core, each storing
batches of 1,000 with one compare-and-swap script call) is timed as the store grows;
beside it, in the same run, one process (``Vault.import_many``), the one-by-one path
``Vault.import_response``, and one process under ``appendfsync everysec``.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.harness import stack
from bench.profile import Profile
from bench.report import Check, Section, Table
from worker.importer import import_responses
from worker.sandbox import Sandbox
from worker.vault import Vault

TARGET_PER_SECOND = 20_000
#: ``expires_in`` of a token already inside the default refresh margin (900 s): due now.
DUE_NOW = 600
#: ``expires_in`` of a fresh token, as Miro issues it.
FRESH = 3599
#: Grants asked of the sandbox at once: bounds the memory a million-credential seed holds.
CHUNK = 50_000
#: Importing processes: one per core, as ``import --jobs`` is advised for a migration.
PROCESSES = os.cpu_count() or 1
ONE_PROCESS = "one process, batches of 1,000 (import_many), always"


@dataclass
class SeedRun:
    """Credentials stored, and the wall and CPU seconds (of the importing processes) it took."""

    count: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.count * 1e6 if self.count else 0.0

    def add(self, count: int, work: Callable[[], object]) -> None:
        wall, cpu = time.perf_counter(), _importers_cpu()
        work()
        self.seconds += time.perf_counter() - wall
        self.cpu_seconds += _importers_cpu() - cpu
        self.count += count


def _importers_cpu() -> float:
    """CPU seconds of this process and of its children reaped so far (the forked importers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def responses(sandbox: Sandbox, count: int, expires_in: int | None = None) -> list[dict[str, Any]]:
    """Exchange-shaped token responses of ``count`` new sandbox users."""
    made = sandbox.create_grants(count)
    if expires_in is not None:
        for response in made:
            response["expires_in"] = expires_in
    return made


def seed(vault: Vault, sandbox: Sandbox, count: int, run: SeedRun | None = None) -> SeedRun:
    """Import ``count`` new users, one process per core (counted into ``run``).

    Only the import is timed; ``cpu_seconds`` are the importing processes' together.
    """
    run = run or SeedRun()
    for start in range(0, count, CHUNK):
        batch = responses(sandbox, min(CHUNK, count - start))
        run.add(len(batch), lambda batch=batch: import_responses(vault, batch, jobs=PROCESSES))
    return run


def _side_run(count: int, appendfsync: str, one_by_one: bool) -> SeedRun:
    with stack(appendfsync=appendfsync) as running:
        vault = running.vault()
        batch = responses(running.sandbox, count)
        run = SeedRun()
        if one_by_one:
            run.add(count, lambda: [vault.import_response(body) for body in batch])
        else:
            run.add(count, lambda: vault.import_many(batch))
        return run


def section(growth: list[tuple[int, SeedRun]], profile: Profile) -> Section:
    """The seeding figures: the batch path as the store grew, and the side figures."""
    sample = profile.seed_side_sample
    side = {
        "one by one (import_response), always": _side_run(sample // 5, "always", True),
        ONE_PROCESS: _side_run(sample, "always", False),
        "one process, batches of 1,000 (import_many), everysec": _side_run(
            sample, "everysec", False
        ),
    }
    total = SeedRun()
    rows = []
    for size, run in growth:
        total.count += run.count
        total.seconds += run.seconds
        total.cpu_seconds += run.cpu_seconds
        name = f"{PROCESSES} processes (import --jobs {PROCESSES}), store growing to {size:,}"
        rows.append([name, run.count, run.per_second, run.cpu_us])
    rows += [[name, run.count, run.per_second, run.cpu_us] for name, run in side.items()]
    single = side["one by one (import_response), always"].per_second
    one_process = side[ONE_PROCESS].per_second
    check = Check(
        figure=f"seeding, import --jobs {PROCESSES} in batches of 1,000 (appendfsync always)",
        value=total.per_second,
        unit="credentials/s",
        target=f">= {TARGET_PER_SECOND:,}/s",
        met=total.per_second >= TARGET_PER_SECOND,
        note=f"{total.per_second / one_process:.2f}x one process ({one_process:,.0f}/s), "
        f"{total.per_second / single:.0f}x one by one ({single:,.0f}/s); "
        f"{total.cpu_us:.0f} µs CPU each in the importing processes",
    )
    table = Table(
        "Seeding (Redis with appendfsync always unless said)",
        ["path", "credentials", "per second", "importer CPU µs each"],
        rows,
    )
    data = {
        "growth": [{"size": size, **vars(run)} for size, run in growth],
        "side": {name: vars(run) for name, run in side.items()},
    }
    return Section("seeding", [check], [table], data)
