"""One store grown through the profile's sizes: seeding, memory and scan cost at each.

The store is seeded through the import path (that is the seeding benchmark), its memory read
after each step, and the scan measured twice per size: with nothing due, and with ``due``
credentials due (users re-imported with tokens that expire within the refresh margin, so
both their records and the due index say so). They are re-imported fresh afterwards.
"""

from __future__ import annotations

import time
from typing import Any

from bench import memory, scan, seeding
from bench.harness import Stack, stack, wait_until
from bench.profile import Profile
from bench.report import Section

#: A rewrite of a million credentials' append-only file takes seconds; this is far beyond.
SAVES_TIMEOUT_S = 600.0

# SETTLING: right after a large seeding, the first pass of idle ticks is slower for a few
# seconds, and by more the more was seeded (200,000 credentials: median 1.98 ms, then 1.12 ms
# in the next pass; 10,000: 1.04 then 0.95), with no background save running and no dirty
# pages waiting. That pass is run untimed, so the figure is the store's, not the seeding's.


def run(profile: Profile) -> list[Section]:
    with stack() as running:
        vault = running.vault()
        client = running.redis()
        baseline = int(client.info("memory")["used_memory"])
        due_users = seeding.responses(running.sandbox, profile.due)
        growth: list[tuple[int, seeding.SeedRun]] = []
        memories, points = [], []
        stored = 0
        for size in profile.store_sizes:
            step = seeding.SeedRun()
            if not stored:
                step.add(len(due_users), lambda: vault.import_many(due_users))
            seeding.seed(vault, running.sandbox, size - stored - step.count, step)
            growth.append((size, step))
            stored = size
            memories.append(memory.measure(client, baseline, size))
            points.append(_scan_point(running, profile, due_users, size))
    return [
        seeding.section(growth, profile),
        memory.section(memories),
        scan.section(points, profile.due),
    ]


def _scan_point(
    running: Stack, profile: Profile, due_users: list[dict[str, Any]], size: int
) -> dict[str, Any]:
    vault = running.vault()
    point: dict[str, Any] = {"size": size, "waited_for_saves_s": _background_saves_done(running)}
    scan.service_tick(running, profile.scan_repeats)  # settling: see SETTLING above
    point["service_idle"] = scan.service_tick(running, profile.scan_repeats, profile.idle_passes)
    point["naive_idle"] = scan.naive_scan(vault)
    vault.import_many([{**user, "expires_in": seeding.DUE_NOW} for user in due_users])
    point["service_due"] = scan.service_tick(running, profile.scan_repeats)
    point["naive_due"] = scan.naive_scan(vault)
    vault.import_many([{**user, "expires_in": seeding.FRESH} for user in due_users])
    return point


def _background_saves_done(running: Stack) -> float:
    """Wait out an append-only-file rewrite or snapshot that seeding set off; seconds waited.

    Redis forks for them once its file has grown enough, and on two cores the child's work
    would be timed as the scan's.
    """
    client = running.redis()
    started = time.monotonic()

    def settled() -> bool:
        persistence = client.info("persistence")
        busy = ("aof_rewrite_in_progress", "aof_rewrite_scheduled", "rdb_bgsave_in_progress")
        return not any(int(persistence.get(flag, 0)) for flag in busy)

    wait_until(settled, SAVES_TIMEOUT_S, "Redis's background saves to finish")
    return time.monotonic() - started
