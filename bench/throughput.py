"""Refresh throughput and CPU of one worker process, beside the bare minimum, in one run.

For each sandbox latency L and concurrency C: a fresh Redis and sandbox, credentials that are
all due, already queued in ``refresh_due`` tasks as the scan queues a backlog (REFRESH_CHUNK
each), and one ``celery worker`` started as the Procfile starts it (threads pool, ``-l
INFO``, task events on). After a warm-up, refreshes (counted by the sandbox) and the worker's
CPU time (user + system, from the kernel) are measured over a window. The ideal at L and C
is C/L refreshes per second.

Beside it, with the same L and C: ``bench.floor`` (that bare work as a Celery task, in a
worker configured like the service's: what Celery itself costs) and ``bench.bare`` (only
posts, encrypts and writes, in plain threads). Each run counts the CPU that other processes
on the machine used meanwhile ("other load"): a figure taken beside a busy neighbour is
disturbed and worth repeating. At the point the targets are about (the slowest latency, the
default concurrency) the service and the bare loop run ``target_runs`` times in turn (three in
the full profile), and their median runs stand for it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
from celery import Celery

from bench import floor, seeding
from bench.harness import ROOT, Stack, Window, service, stack, wait_until
from bench.profile import Profile
from bench.report import Check, Section, Table
from settings import SETTINGS
from worker.scan import chunked

#: The name of a worker process among those a run watches ("worker 1", "worker 2", ...).
WORKER = "worker"
MIN_FRACTION = 0.8
MIN_RATE = 340.0
MAX_CPU_MS = 2.0
#: No worker on this machine refreshes faster than this; sizes the supply of due credentials.
CEILING_PER_SECOND = 1200.0
#: Credentials per refresh task, as the scan sends them when more are due than threads.
REFRESH_CHUNK = int(SETTINGS["REFRESH_CHUNK"].default)
#: Seconds of supply beyond warm-up and window: worker start-up, prefetch, slack.
SUPPLY_SLACK_S = 10.0


def supply(latency_ms: float, concurrency: int, profile: Profile) -> int:
    """Due credentials enough to keep the worker busy through warm-up and window."""
    ideal = concurrency / latency_ms * 1000 if latency_ms > 0 else CEILING_PER_SECOND
    rate = min(CEILING_PER_SECOND, ideal)
    return math.ceil(rate * (profile.warmup_s + profile.window_s + SUPPLY_SLACK_S))


def queue_tasks(running: Stack, task: str, calls: list[list[Any]]) -> None:
    """One ``task`` message per argument list on the broker, as the scan would queue them."""
    app = Celery(broker=running.redis_server.url, set_as_current=False)
    try:
        with app.producer_or_acquire() as producer, producer.batch():
            for arguments in calls:
                app.send_task(task, args=arguments, producer=producer)
    finally:
        app.close()


def service_run(
    latency_ms: float, concurrency: int, profile: Profile, workers: int = 1
) -> dict[str, Any]:
    """Refreshes per second and CPU per refresh (of all workers together) of the service."""

    def prepare(running: Stack) -> None:
        count = supply(latency_ms, concurrency * workers, profile)
        users = seeding.responses(running.sandbox, count, seeding.DUE_NOW)
        ids = [str(c.id) for c in running.vault().import_many(users)]
        chunks = chunked(ids, spread=concurrency, most=REFRESH_CHUNK)
        queue_tasks(running, "tasks.refresh.refresh_due", [[chunk] for chunk in chunks])

    return _worker_run(latency_ms, concurrency, profile, "worker", prepare, workers=workers)


def floor_run(latency_ms: float, concurrency: int, profile: Profile) -> dict[str, Any]:
    """The same for ``bench.floor``: the bare refresh as a Celery task, nothing else."""

    def prepare(running: Stack) -> None:
        users = running.sandbox.create_grants(supply(latency_ms, concurrency, profile))
        calls = [[user["user_id"], user["refresh_token"]] for user in users]
        queue_tasks(running, floor.TASK, calls)

    return _worker_run(latency_ms, concurrency, profile, "bench.floor", prepare)


def _worker_run(
    latency_ms: float,
    concurrency: int,
    profile: Profile,
    app: str,
    prepare: Callable[[Stack], None],
    *,
    workers: int = 1,
) -> dict[str, Any]:
    with stack(latency_ms=latency_ms) as running:
        prepare(running)
        with service(running) as processes:
            started = [
                processes.worker(concurrency, name=f"w{number}", app=app)
                for number in range(1, workers + 1)
            ]
            refreshes = lambda: running.sandbox.stats()["refreshes"]  # noqa: E731
            wait_until(refreshes, 30, "the first refresh")
            time.sleep(profile.warmup_s)
            before = refreshes()
            with Window(_watched(running, *started)) as window:
                time.sleep(profile.window_s)
            count = refreshes() - before
            left = running.redis().llen("celery")
    return _figures(count, window, latency_ms, concurrency, starved=left == 0)


def bare_run(latency_ms: float, concurrency: int, profile: Profile) -> dict[str, Any]:
    """The bare loop (``bench.bare``) at the same latency and concurrency."""
    with stack(latency_ms=latency_ms) as running:
        users = running.sandbox.create_grants(supply(latency_ms, concurrency, profile))
        spec = {
            "api_url": running.sandbox.url,
            "redis_url": running.redis_server.url,
            "client_id": running.env["MIRO_CLIENT_ID"],
            "client_secret": running.env["MIRO_CLIENT_SECRET"],
            "key": running.env["TOKEN_ENCRYPTION_KEYS"],
            "tokens": [[user["user_id"], user["refresh_token"]] for user in users],
            "threads": concurrency,
            "warmup_s": profile.warmup_s,
            "window_s": profile.window_s,
        }
        path = running.directory / "bare.json"
        path.write_text(json.dumps(spec))
        children_before = _children_cpu()
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.bare", str(path)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        watched = _watched(running)
        with Window(watched) as window:
            output, _ = process.communicate(timeout=300)
        # The loop has exited: its CPU comes from the kernel's account of reaped children.
        window.cpu["bare"] = _children_cpu() - children_before
    if process.returncode:
        raise RuntimeError(f"bench.bare exited with {process.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    rate = result["count"] / result["seconds"]
    return {
        "rate": rate,
        "cpu_ms": result["cpu_seconds"] / max(1, result["count"]) * 1000,
        "fraction": _fraction(rate, latency_ms, concurrency),
        "starved": result["starved"],
        "others_cores": window.others,
    }


def _watched(running: Stack, *workers: psutil.Process) -> dict[str, psutil.Process]:
    """The processes a throughput run consists of; the sandbox runs in this one."""
    assert running.redis_server.process is not None
    return {
        **{f"{WORKER} {number}": worker for number, worker in enumerate(workers, 1)},
        "redis": psutil.Process(running.redis_server.process.pid),
        "sandbox": psutil.Process(),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _fraction(rate: float, latency_ms: float, concurrency: int) -> float | None:
    return rate / (concurrency / latency_ms * 1000) if latency_ms > 0 else None


def _figures(
    count: int, window: Window, latency_ms: float, concurrency: int, *, starved: bool
) -> dict[str, Any]:
    rate = count / window.seconds
    per = {name: seconds / max(1, count) * 1000 for name, seconds in window.cpu.items()}
    return {
        "rate": rate,
        "cpu_ms": sum(ms for name, ms in per.items() if name.startswith(WORKER)),
        "redis_cpu_ms": per["redis"],
        "sandbox_cpu_ms": per["sandbox"],
        "fraction": _fraction(rate, latency_ms, concurrency),
        "starved": starved,
        "others_cores": window.others,
    }


def run(profile: Profile) -> list[Section]:
    default = int(os.environ.get("WORKER_CONCURRENCY") or SETTINGS["WORKER_CONCURRENCY"].default)
    slowest = max(profile.latencies_ms)
    results = [
        _grid_point(
            latency, concurrency, profile, at_target=(latency, concurrency) == (slowest, default)
        )
        for latency in profile.latencies_ms
        for concurrency in sorted({*profile.concurrencies, default})
    ]
    per_core = os.cpu_count() or 1
    scaled = service_run(slowest, default, profile, workers=per_core)
    data = {
        "default_concurrency": default,
        "results": results,
        "one_worker_per_core": {"workers": per_core, "latency_ms": slowest, **scaled},
    }
    checks = [*_checks(results, default), _scaling_check(results, default, scaled, per_core)]
    return [Section("throughput", checks, [_table(results)], data)]


def _grid_point(
    latency_ms: float, concurrency: int, profile: Profile, *, at_target: bool
) -> dict[str, Any]:
    """The service, the Celery floor and the bare loop at one latency and concurrency.

    At the point the targets are about, the service and the bare loop run
    ``profile.target_runs`` times, one after the other in turn, and their median runs stand
    for the point; every run is kept in the figures.
    """
    runs = profile.target_runs if at_target else 1
    services, bares = [], []
    for _ in range(runs):
        services.append(service_run(latency_ms, concurrency, profile))
        bares.append(bare_run(latency_ms, concurrency, profile))
    return {
        "latency_ms": latency_ms,
        "concurrency": concurrency,
        "service": median_run(services),
        "floor": floor_run(latency_ms, concurrency, profile),
        "bare": median_run(bares),
        "service_runs": services,
        "bare_runs": bares,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median rate (the upper one of an even number of runs).

    A real run rather than averaged figures, so that its CPU figure belongs to its rate.
    """
    return sorted(runs, key=lambda run: run["rate"])[len(runs) // 2]


def _spread(runs: list[dict[str, Any]]) -> str:
    """``; median of 3 runs: 310 to 358/s, 2.25 to 2.59 ms``, or nothing for a single run."""
    if len(runs) < 2:
        return ""
    rates = sorted(run["rate"] for run in runs)
    cpus = sorted(run["cpu_ms"] for run in runs)
    return (
        f"; median of {len(runs)} runs: {rates[0]:.0f} to {rates[-1]:.0f}/s, "
        f"{cpus[0]:.2f} to {cpus[-1]:.2f} ms"
    )


COLUMNS = [
    "latency ms",
    "threads",
    "refreshes/s",
    "of ideal C/L",
    "worker CPU ms each",
    "Redis CPU ms",
    "sandbox CPU ms",
    "Celery floor /s",
    "floor CPU ms",
    "bare /s",
    "bare CPU ms",
    "service/bare rate",
    "service/bare CPU",
    "other load (cores)",
]


def _table(results: list[dict[str, Any]]) -> Table:
    rows = []
    for r in results:
        service, floor_, bare = r["service"], r["floor"], r["bare"]
        runs = (service, floor_, bare)
        other = f"{max(run['others_cores'] for run in runs):.2f}"
        if any(run["starved"] for run in runs):
            other += " (starved)"
        rows.append(
            [
                *(r["latency_ms"], r["concurrency"], service["rate"], service["fraction"]),
                *(service["cpu_ms"], service["redis_cpu_ms"], service["sandbox_cpu_ms"]),
                *(floor_["rate"], floor_["cpu_ms"], bare["rate"], bare["cpu_ms"]),
                *(service["rate"] / bare["rate"], service["cpu_ms"] / bare["cpu_ms"], other),
            ]
        )
    return Table("Refresh throughput, one worker process", COLUMNS, rows)


def _default_point(results: list[dict[str, Any]], default: int) -> dict[str, Any]:
    """The run the targets are about: the slowest latency, at the default concurrency."""
    slowest = max(r["latency_ms"] for r in results)
    return next(r for r in results if r["latency_ms"] == slowest and r["concurrency"] == default)


def _scaling_check(
    results: list[dict[str, Any]], default: int, scaled: dict[str, Any], workers: int
) -> Check:
    """How the machine's figure grows with one worker process per core (no target of its own)."""
    one = _default_point(results, default)["service"]
    return Check(
        f"refreshes/s with {workers} worker processes (one per core), "
        f"{default} threads each, at {max(r['latency_ms'] for r in results):g} ms",
        scaled["rate"],
        "/s",
        "how it scales",
        None,
        f"{scaled['rate'] / one['rate']:.2f}x one worker; {scaled['cpu_ms']:.2f} ms of worker "
        "CPU each",
    )


def _checks(results: list[dict[str, Any]], default: int) -> list[Check]:
    point = _default_point(results, default)
    service, floor_, bare = point["service"], point["floor"], point["bare"]
    at = f"at {point['latency_ms']:g} ms, default concurrency {default}"
    best = min(r["service"]["cpu_ms"] for r in results)
    return [
        Check(
            f"refreshes/s {at}",
            service["rate"],
            "/s",
            f">= {MIN_RATE:g}/s (aim 400)",
            service["rate"] >= MIN_RATE,
            f"bare minimum {bare['rate']:.0f}/s (service/bare {service['rate'] / bare['rate']:.2f})"
            f"; Celery floor {floor_['rate']:.0f}/s{_spread(point['service_runs'])}",
        ),
        Check(
            f"fraction of ideal C/L {at}",
            service["fraction"],
            "",
            f">= {MIN_FRACTION:g}",
            (service["fraction"] or 0) >= MIN_FRACTION,
        ),
        Check(
            f"worker CPU per refresh, Celery included, {at}",
            service["cpu_ms"],
            "ms",
            f"<= {MAX_CPU_MS:g} ms",
            service["cpu_ms"] <= MAX_CPU_MS,
            f"best of the grid {best:.2f} ms; Celery floor {floor_['cpu_ms']:.2f} ms, bare "
            f"minimum {bare['cpu_ms']:.2f} ms",
        ),
    ]
