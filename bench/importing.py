"""The import command, timed whole as a user times it, beside a bare floor, in one run.

One file of sandbox token responses (``profile.import_responses``: 300,000 quick, a million
full) is imported into one Redis by turns:

- the floor, ``python -m bench.bare_import FILE``: one process reads the file whole, encrypts
  each pair with Fernet and stores it with a pipelined ``SET`` and ``ZADD``
  (:mod:`bench.bare_import`);
- the command, ``python -m worker import FILE --jobs N`` with N the cores.

Each is a process of its own, timed by the wall clock from its start to its exit (Python's
start-up included), Redis emptied and its append-only file rewritten before each. The pair
runs ``profile.import_pairs`` times, and the medians stand for it. Beside the ratio: the
largest importer process's peak resident memory (the command streams the file; the floor
holds it whole), and the machine's yardstick, measured just before.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.harness import ROOT, Stack, Window, stack, wait_until
from bench.profile import Profile
from bench.report import Check, Section, Table, python_loop_seconds
from worker.idindex import stored_count
from worker.sandbox import Sandbox

TARGET_RATIO = 1.6
TARGET_PEAK_MB = 500
#: The size the memory target is stated at.
TARGET_PEAK_AT = 1_000_000
#: Importing processes: one per core, as ``import --jobs`` is advised for a migration.
PROCESSES = os.cpu_count() or 1
#: Sandbox grants made at once while the file is written.
CHUNK = 50_000
#: Longer than Redis takes to rewrite the append-only file of a million credentials.
RUN_TIMEOUT_S = 1800.0


@dataclass
class Run:
    """One process timed from its start to its exit."""

    seconds: float
    #: CPU seconds of the process and its children.
    cpu_seconds: float
    #: The peak resident memory of the process or of any of its children, whichever is
    #: largest (``ru_maxrss`` as ``wait4`` reports it), in bytes.
    peak_rss: int
    #: CPU seconds of the processes that worked for it (Redis).
    helpers_cpu_seconds: float
    #: Cores' worth of CPU that processes outside the run used meanwhile.
    other_load: float
    output: str


def measured_run(
    command: list[str], env: dict[str, str], helpers: dict[str, psutil.Process] | None = None
) -> Run:
    """Run ``command`` to its end through :mod:`bench.timed`; what it measured.

    Args:
        command: the command line.
        env: its environment.
        helpers: processes that work for it (Redis), not counted as other load.

    Raises:
        RuntimeError: the command failed (its error output is in the message).
    """
    with tempfile.TemporaryDirectory() as directory:
        result, out, err = (Path(directory) / name for name in ("result", "out", "err"))
        timed = [sys.executable, "-m", "bench.timed", str(result), *command]
        watched = {"bench": psutil.Process(), **(helpers or {})}
        with out.open("wb") as stdout, err.open("wb") as stderr, Window(watched) as window:
            subprocess.run(timed, env=env, cwd=ROOT, stdout=stdout, stderr=stderr, check=True)
        measured = json.loads(result.read_text())
        if measured["exit_code"] != 0:
            raise RuntimeError(f"{command} failed:\n{err.read_text()[-3000:]}")
        output = out.read_text()
    own_load = measured["cpu_seconds"] / window.seconds
    return Run(
        measured["seconds"],
        measured["cpu_seconds"],
        measured["peak_rss"],
        sum(window.cpu[name] for name in helpers or {}),
        max(0.0, window.others - own_load),
        output,
    )


def write_responses(path: Path, sandbox: Sandbox, count: int, *, lines: bool = False) -> None:
    """A file of ``count`` new users' token responses: a JSON array, or JSON Lines."""
    with path.open("w", encoding="utf-8") as file:
        separator = "\n" if lines else ",\n"
        file.write("" if lines else "[\n")
        for start in range(0, count, CHUNK):
            grants = sandbox.create_grants(min(CHUNK, count - start))
            text = separator.join(json.dumps(grant) for grant in grants)
            file.write((separator if start else "") + text)
        file.write("\n" if lines else "\n]\n")


def run(profile: Profile) -> list[Section]:
    count = profile.import_responses
    with stack() as running:
        path = running.directory / "responses.json"
        write_responses(path, running.sandbox, count)
        env = {**os.environ, **running.env, "PYTHONPATH": str(ROOT)}
        assert running.redis_server.process is not None
        redis = {"redis": psutil.Process(running.redis_server.process.pid)}
        floor = [sys.executable, "-m", "bench.bare_import", str(path)]
        command = [sys.executable, "-m", "worker", "import", str(path), "--jobs", str(PROCESSES)]
        yardstick = python_loop_seconds()
        floors, commands = [], []
        for _ in range(profile.import_pairs):
            _empty(running)
            floors.append(measured_run(floor, env, redis))
            _empty(running)
            commands.append(measured_run(command, env, redis))
            _check_stored(running, commands[-1], count)
    return [section(count, floors, commands, yardstick)]


def _empty(running: Stack) -> None:
    """Redis as a fresh one: no keys, its append-only file rewritten small (and done)."""
    client = running.redis()
    client.flushall()
    client.bgrewriteaof()

    def rewritten() -> bool:
        persistence = client.info("persistence")
        busy = ("aof_rewrite_in_progress", "aof_rewrite_scheduled")
        return not any(int(persistence.get(flag, 0)) for flag in busy)

    wait_until(rewritten, RUN_TIMEOUT_S, "Redis's append-only file rewrite")


def _check_stored(running: Stack, command: Run, count: int) -> None:
    """The command said it stored every response, and Redis counts them all."""
    imported = json.loads(command.output)["imported"]
    stored = stored_count(running.redis())
    if imported != count or stored != count:
        raise RuntimeError(f"imported {imported} and stored {stored} of {count} responses")


def section(count: int, floors: list[Run], commands: list[Run], yardstick: float) -> Section:
    floor_s = statistics.median(run.seconds for run in floors)
    command_s = statistics.median(run.seconds for run in commands)
    ratio = floor_s / command_s
    peak = max(run.peak_rss for run in commands)
    peak_mb = peak / 2**20
    checks = [
        Check(
            figure=f"import FILE --jobs {PROCESSES}, whole command, vs one-process bare floor",
            value=ratio,
            unit="x",
            target=f">= {TARGET_RATIO}x",
            met=ratio >= TARGET_RATIO,
            note=f"{count:,} responses: {count / command_s:,.0f}/s against {count / floor_s:,.0f}"
            f"/s (median of {len(commands)}); 10M-addition yardstick {yardstick:.2f} s",
        ),
        Check(
            figure=f"largest importer process's peak RSS at {count:,} responses",
            value=peak_mb,
            unit="MB",
            target=f"< {TARGET_PEAK_MB} MB at {TARGET_PEAK_AT:,}",
            met=peak_mb < TARGET_PEAK_MB if count >= TARGET_PEAK_AT else None,
            note=f"the floor, which holds the file whole: "
            f"{max(run.peak_rss for run in floors) / 2**20:,.0f} MB",
        ),
    ]
    rows = [
        [
            name,
            run.seconds,
            count / run.seconds,
            run.cpu_seconds / count * 1e6,
            run.helpers_cpu_seconds / count * 1e6,
            run.peak_rss / 2**20,
            run.other_load,
        ]
        for runs, name in ((floors, "bare floor, one process"), (commands, "import --jobs"))
        for run in runs
    ]
    table = Table(
        f"Import of {count:,} responses, the whole command against the bare floor",
        [
            "process",
            "seconds",
            "responses/s",
            "its CPU µs each",
            "Redis CPU µs each",
            "peak RSS MB",
            "other load (cores)",
        ],
        rows,
    )
    data = {
        "responses": count,
        "floors": [_without_output(run) for run in floors],
        "commands": [_without_output(run) for run in commands],
        "yardstick_s": yardstick,
        "machine_cores": psutil.cpu_count(),
    }
    return Section("import", checks, [table], data)


def _without_output(run: Run) -> dict[str, Any]:
    return {key: value for key, value in asdict(run).items() if key != "output"}
