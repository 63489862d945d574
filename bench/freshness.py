"""Freshness under load: does every credential get refreshed before it expires, and how late?

The service (``celery beat`` and one ``celery worker`` per core, each at the default
concurrency, with the default ``SCAN_INTERVAL``) keeps ``fresh_credentials`` credentials
whose due times are spread as in production: tokens issued at random moments over the last
lifetime, so the due times are uniform over the next refresh cycle. The clock is accelerated
by shorter lifetimes in the sandbox (``fresh_ttl`` instead of 3,599 s, with the refresh
margin scaled alike) and Miro's latency is 150 ms.

Each credential's refresh time is read back from the sandbox (a refresh sets the grant's
expiry to refresh time + lifetime), its due time and expiry from the store as seeded. The run
is shorter than one refresh cycle, so each credential is refreshed at most once.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from bench.harness import Stack, service, stack, wait_until
from bench.profile import Profile
from bench.report import Check, Section, Table, percentile
from settings import Settings
from worker.constants import DUE_INDEX

LATENCY_MS = 150.0
#: One worker process per core, as the service is scaled: a process uses one core at most.
WORKERS = os.cpu_count() or 1
MAX_P99_LAG_S = 2.0
#: Production's refresh margin as a fraction of the access token's life (900 of 3,599 s).
MARGIN_FRACTION = 900 / 3599
#: Seconds from a credential's import to its first due time (room for the import itself),
#: as a fraction of the lifetime and at most.
LEAD_IN = 0.05
LEAD_IN_S = 30.0
#: Credentials due in the last seconds of the run may still be in flight when it stops.
TAIL_S = 5.0
#: Timeouts that fit a margin of a few seconds (the tiny profile's), which the defaults'
#: retry after a dead worker would not (settings.py: ``recovery_seconds``).
SHORT_MARGIN_ENV = {
    "HTTP_TIMEOUT": "1",
    "COMMIT_RETRY_SECONDS": "1",
    "LOCK_TTL": "2.5",
    "CLAIM_LEASE": "2",
}


def run(profile: Profile) -> list[Section]:
    ttl = profile.fresh_ttl
    margin = round(ttl * MARGIN_FRACTION)
    env = {"ACCESS_REFRESH_MARGIN": str(margin)}
    if margin <= Settings.from_env({}).recovery_seconds:
        env.update(SHORT_MARGIN_ENV)
    with stack(access_ttl=ttl, latency_ms=LATENCY_MS, env=env) as running:
        with service(running) as processes:
            for number in range(WORKERS):
                processes.worker(name=f"w{number + 1}")
            processes.beat()
            schedule = _seed(running, profile.fresh_credentials, ttl, margin)
            started = time.time()
            time.sleep(profile.fresh_run_s)
            stopped = time.time()
            processes.stop("beat")
            _drain(running)
        refreshed = _refresh_times(running, ttl)
    result = _analyse(schedule, refreshed, started, stopped)
    result.update(credentials=profile.fresh_credentials, ttl=ttl, margin=margin)
    return [_section(result, profile)]


def _seed(running: Stack, count: int, ttl: int, margin: int) -> dict[str, tuple[float, int]]:
    """Import users whose tokens were issued at random over the last lifetime.

    Returns each credential's due time and access token expiry, as stored.
    """
    vault = running.vault()
    users = running.sandbox.create_grants(count)
    shortest = int(margin * 1.1 + min(LEAD_IN_S, ttl * LEAD_IN))
    for user in users:
        user["expires_in"] = random.randint(shortest, ttl)
    stored = vault.import_many(users)
    due = dict(running.redis().zrange(DUE_INDEX, 0, -1, withscores=True))
    return {str(c.id): (due[str(c.id).encode()], c.access_expires_at or 0) for c in stored}


def _drain(running: Stack) -> None:
    """Wait until the worker has run everything beat queued before it stopped."""
    client = running.redis()

    def idle() -> bool:
        return client.llen("celery") == 0 and running.sandbox.stats()["token_in_flight"] == 0

    wait_until(idle, 120, "the queued refreshes to finish")
    time.sleep(1.0)


def _refresh_times(running: Stack, ttl: int) -> dict[str, float]:
    return {
        f"{grant['team_id']}:{grant['user_id']}": grant["access_expires_at"] - ttl
        for grant in running.sandbox.grants()
        if grant["rotations"] >= 1
    }


def _analyse(
    schedule: dict[str, tuple[float, int]],
    refreshed: dict[str, float],
    started: float,
    stopped: float,
) -> dict[str, Any]:
    leads, lags, missed, expired = [], [], 0, 0
    for credential_id, (due, expires) in schedule.items():
        at = refreshed.get(credential_id)
        if expires <= stopped and (at is None or at > expires):
            expired += 1
        if due > stopped - TAIL_S:
            continue
        if at is None:
            missed += 1
            continue
        leads.append(round(expires - at, 3))
        lags.append(round(at - due, 3))
    return {
        "window_s": stopped - started,
        "refreshes": len(refreshed),
        "due_in_window": len(leads) + missed,
        "missed": missed,
        "expired": expired,
        "leads": leads,
        "lags": lags,
    }


def _section(result: dict[str, Any], profile: Profile) -> Section:
    lags, leads = result["lags"], result["leads"]
    p99 = percentile(lags, 0.99)
    checks = [
        Check(
            "credentials expired unrefreshed",
            result["expired"],
            "",
            "0",
            result["expired"] == 0,
            f"{result['refreshes']:,} refreshes of {result['credentials']:,} credentials in "
            f"{result['window_s']:.0f} s",
        ),
        Check(
            "p99 lag of a refresh behind its due time",
            p99,
            "s",
            f"< {MAX_P99_LAG_S:g} s",
            p99 is not None and p99 < MAX_P99_LAG_S,
            f"p50 {percentile(lags, 0.5) or 0:.2f} s, max {max(lags, default=0):.2f} s",
        ),
    ]
    row = [
        result["credentials"],
        result["ttl"],
        result["margin"],
        result["refreshes"],
        result["due_in_window"],
        result["missed"],
        result["expired"],
        percentile(lags, 0.5),
        p99,
        max(lags, default=None),
        min(leads, default=None),
        percentile(leads, 0.01),
        percentile(leads, 0.5),
    ]
    columns = [
        "credentials",
        "lifetime s",
        "margin s",
        "refreshes",
        "due in window",
        "missed",
        "expired",
        "lag p50 s",
        "lag p99 s",
        "lag max s",
        "lead min s",
        "lead p1 s",
        "lead p50 s",
    ]
    table = Table(
        f"Freshness ({profile.fresh_run_s:g} s at an accelerated clock, {LATENCY_MS:g} ms "
        "Miro latency; lead = seconds before expiry, lag = seconds after due)",
        columns,
        [row],
    )
    return Section("freshness", checks, [table], result)
