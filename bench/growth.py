"""One store grown through the profile's sizes: seeding, memory and scan cost at each.

The store is seeded through the import path (that is the seeding benchmark), its memory read
after each step, and the scan measured twice per size: with nothing due, and with ``due``
credentials due (users re-imported with tokens that expire within the refresh margin, so
both their records and the due index say so). They are re-imported fresh afterwards.
"""

from __future__ import annotations

from typing import Any

from bench import memory, scan, seeding
from bench.harness import Stack, stack
from bench.profile import Profile
from bench.report import Section


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
    point: dict[str, Any] = {"size": size}
    point["service_idle"] = scan.service_tick(running, profile.scan_repeats)
    point["naive_idle"] = scan.naive_scan(vault)
    vault.import_many([{**user, "expires_in": seeding.DUE_NOW} for user in due_users])
    point["service_due"] = scan.service_tick(running, profile.scan_repeats)
    point["naive_due"] = scan.naive_scan(vault)
    vault.import_many([{**user, "expires_in": seeding.FRESH} for user in due_users])
    return point
