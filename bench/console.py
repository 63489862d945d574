"""The console: server time of its pages, and the memory of the id index, as the store grows.

The store is seeded through the import path with teams of realistic sizes (most of one or a
few users, a tail of large ones, up to 5,000), then the real ``python -m worker web`` is asked
for the console's pages: the first page and a later one of each view, a search by a large
team, a small team and a user, and the JSON of the first page. Each figure is the app's own
time (its ``Server-Timing`` header): the issue's target is 300 ms of server time with a
million credentials stored.

The index's memory is measured by deleting it and building it again with ``reindex`` (which
is timed too): ``used_memory`` before and after the deletion, per credential.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
import requests

from bench.harness import ROOT, Stack, stack
from bench.memory import keys_bytes
from bench.profile import Profile
from bench.report import Check, Section, Table
from soak.support import free_port, wait_until
from worker.constants import (
    DUE_INDEX,
    ID_BUCKETS_USED,
    ID_INDEX_COMPLETE,
    ID_TEAM_KEY,
    ID_USER_BUCKET_KEY,
)
from worker.idindex import USER_BUCKETS, reindex
from worker.importer import import_responses
from worker.listing import SEPARATOR
from worker.vault import Vault

TARGET_MS = 300.0
#: Requests of each kind; the figure is their median, the worst is shown beside it.
REPEATS = 7
#: Team sizes: Pareto with this shape (a mean near 5), capped.
TEAM_SHAPE = 1.2
LARGEST_TEAM = 5_000
#: Grants asked of the sandbox at once, as in the seeding benchmark.
CHUNK = 50_000


def run(profile: Profile) -> list[Section]:
    rng = random.Random(24)
    points = []
    with stack() as running:
        vault = running.vault()
        client = running.redis()
        baseline = int(client.info("memory")["used_memory"])
        teams: dict[str, int] = {}
        for size in profile.store_sizes:
            _seed(vault, running, size - sum(teams.values()), teams, rng)
            point: dict[str, Any] = {
                "size": size,
                "largest_team": max(teams.values()),
                **_index_memory(client, size, baseline),
            }
            with _web(running) as url:
                point["requests"] = _timings(url, _requests(client, teams))
            points.append(point)
    return [_section(points)]


def _seed(
    vault: Vault, running: Stack, count: int, teams: dict[str, int], rng: random.Random
) -> None:
    """Import ``count`` new users in new teams of random sizes (``teams``: id -> size)."""
    responses: list[dict[str, Any]] = []
    while count > 0:
        size = min(int(rng.paretovariate(TEAM_SHAPE)), LARGEST_TEAM, count)
        team_id = f"3074457{rng.randrange(10**11, 10**12)}"
        if team_id in teams:
            continue
        teams[team_id] = size
        responses += running.sandbox.create_grants(size, team_id)
        count -= size
        if len(responses) >= CHUNK or count == 0:
            import_responses(vault, responses, jobs=os.cpu_count() or 1)
            responses = []


def _index_memory(client: redis.Redis, size: int, baseline: int) -> dict[str, Any]:
    """Bytes of the index per credential, split by part, and the time ``reindex`` takes."""
    team_sets, user_buckets = ID_TEAM_KEY.format(team="*"), ID_USER_BUCKET_KEY.format(bucket="*")
    teams, users = keys_bytes(client, team_sets), keys_bytes(client, user_buckets)
    used = int(client.info("memory")["used_memory"])
    for pattern in (team_sets, user_buckets):
        _delete(client, pattern)
    client.delete(ID_BUCKETS_USED, ID_INDEX_COMPLETE)
    without = int(client.info("memory")["used_memory"])
    started = time.perf_counter()
    reindex(client)
    rebuilt_s = time.perf_counter() - started
    return {
        "index_bytes": (used - without) / size,
        "team_sets_bytes": teams / size,
        "user_buckets_bytes": users / size,
        "store_bytes": (used - baseline) / size,
        "reindex_s": rebuilt_s,
        "reindex_per_s": size / rebuilt_s,
    }


def _delete(client: redis.Redis, pattern: str) -> None:
    keys = list(client.scan_iter(pattern, count=10_000))
    for start in range(0, len(keys), 1_000):
        client.delete(*keys[start : start + 1_000])


@contextmanager
def _web(running: Stack) -> Iterator[str]:
    """``python -m worker web`` on the benchmark's store, as the Procfile runs it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **running.env,
        "MIRO_REDIRECT_URI": f"{url}/oauth/callback",
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "web", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _answers(f"{url}/healthz"), 30, "the web process to listen")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def _requests(client: redis.Redis, teams: dict[str, int]) -> dict[str, str]:
    """The console's requests measured, by name: path and query string."""
    middle = client.zcard(DUE_INDEX) // 2
    [(member, score)] = client.zrange(DUE_INDEX, middle, middle, withscores=True)
    halfway = f"{score!r}{SEPARATOR}{member.decode()}"
    user = client.zrandmember(DUE_INDEX).decode().partition(":")[2]
    return {
        "due, first page": "/",
        "due, a page halfway": f"/?cursor={halfway}",
        "needing attention": "/?view=failing",
        "all, first page": "/?view=all",
        "all, a page halfway": f"/?view=all&cursor={USER_BUCKETS // 2}{SEPARATOR}0",
        "search: the largest team": f"/?q={max(teams, key=teams.__getitem__)}",
        "search: a team of one": f"/?q={min(teams, key=teams.__getitem__)}",
        "search: a user": f"/?q={user}",
        "JSON, due, first page": "/api/credentials",
    }


def _timings(url: str, paths: dict[str, str]) -> dict[str, dict[str, float]]:
    """Server milliseconds of each request: median and worst of ``REPEATS``."""
    found = {}
    with requests.Session() as session:
        for name, path in paths.items():
            millis = []
            for _ in range(REPEATS):
                response = session.get(f"{url}{path}", timeout=30)
                response.raise_for_status()
                millis.append(float(response.headers["Server-Timing"].split("dur=")[1]))
            found[name] = {"median_ms": statistics.median(millis), "max_ms": max(millis)}
    return found


def _section(points: list[dict[str, Any]]) -> Section:
    largest = points[-1]
    worst = max(timing["max_ms"] for timing in largest["requests"].values())
    checks = [
        Check(
            figure=f"console, slowest page's server time with {largest['size']:,} stored",
            value=worst,
            unit="ms",
            target=f"< {TARGET_MS:.0f} ms",
            met=worst < TARGET_MS,
            note=f"the worst of {REPEATS} of each of {len(largest['requests'])} requests",
        ),
        *(
            Check(
                figure=f"id index memory per credential at {point['size']:,}",
                value=point["index_bytes"],
                unit="bytes",
                target="",
                met=None,
                note=f"team sets {point['team_sets_bytes']:.0f} + user buckets "
                f"{point['user_buckets_bytes']:.0f} (MEMORY USAGE); rebuilt by reindex in "
                f"{point['reindex_s']:.1f} s",
            )
            for point in points
        ),
    ]
    timings = Table(
        "Console: server time in ms (median / worst of 7), by credentials stored",
        ["request", *(f"{point['size']:,}" for point in points)],
        [
            [name, *(_both(point["requests"][name]) for point in points)]
            for name in largest["requests"]
        ],
    )
    memory = Table(
        "Console: the id index's memory and its rebuild",
        [
            "stored",
            "largest team",
            "index bytes each",
            "team sets",
            "user buckets",
            "Redis bytes each, all",
            "reindex s",
            "reindex per s",
        ],
        [
            [
                point["size"],
                point["largest_team"],
                point["index_bytes"],
                point["team_sets_bytes"],
                point["user_buckets_bytes"],
                point["store_bytes"],
                point["reindex_s"],
                point["reindex_per_s"],
            ]
            for point in points
        ],
    )
    return Section("console", checks, [timings, memory], {"points": points})


def _both(timing: dict[str, float]) -> str:
    return f"{timing['median_ms']:.1f} / {timing['max_ms']:.1f}"
