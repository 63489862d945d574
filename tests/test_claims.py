"""Claims a worker holds are renewed until their rotation begins, and never after it; a
worker killed with its work held has that work rotated again within seconds."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from settings import SETTINGS, Settings
from soak.processes import ServiceProcesses
from tests.conftest import CLIENT_ID, wait_for
from worker.claims import ClaimRenewal
from worker.constants import DUE_INDEX, OUTCOME_COUNTERS
from worker.sandbox import Sandbox, SandboxConfig
from worker.scan import chunked
from worker.schedule import JITTER_FRACTION
from worker.vault import Vault

NOW = 1_800_000_000.0
LEASE = 15.0


def _renewal(now: float = NOW) -> ClaimRenewal:
    return ClaimRenewal(LEASE, clock=lambda: now)


def test_the_claims_of_held_tasks_are_pushed_a_lease_from_now(redis_client: redis.Redis) -> None:
    redis_client.zadd(DUE_INDEX, {"1:a": NOW + 1, "1:b": NOW + 2, "1:c": NOW + 3})

    renewed = _renewal().renew(redis_client, {"task-1": ["1:a", "1:b"]})

    assert renewed == 2
    assert redis_client.zscore(DUE_INDEX, "1:a") == NOW + LEASE
    assert redis_client.zscore(DUE_INDEX, "1:b") == NOW + LEASE
    assert redis_client.zscore(DUE_INDEX, "1:c") == NOW + 3  # not held here


def test_a_renewal_never_pulls_a_due_time_in_nor_schedules_what_is_not(
    redis_client: redis.Redis,
) -> None:
    """A rotation elsewhere (a forced one) may have written an hour ahead meanwhile; a
    credential deleted meanwhile, or taken off the schedule, stays off it."""
    redis_client.zadd(DUE_INDEX, {"1:later": NOW + 3600})

    _renewal().renew(redis_client, {"task-1": ["1:later", "1:gone"]})

    assert redis_client.zscore(DUE_INDEX, "1:later") == NOW + 3600
    assert redis_client.zscore(DUE_INDEX, "1:gone") is None


def test_a_credential_whose_rotation_began_is_renewed_no_more(redis_client: redis.Redis) -> None:
    redis_client.zadd(DUE_INDEX, {"1:a": NOW, "1:b": NOW})
    renewal = _renewal()

    renewal.begin("task-1", "1:a")
    renewed = renewal.renew(redis_client, {"task-1": ["1:a", "1:b"]})

    assert renewed == 1
    assert redis_client.zscore(DUE_INDEX, "1:a") == NOW
    assert redis_client.zscore(DUE_INDEX, "1:b") == NOW + LEASE


def test_the_same_credential_queued_again_in_another_task_is_renewed_there(
    redis_client: redis.Redis,
) -> None:
    """A task done is forgotten: a later task holding the same credential renews it."""
    redis_client.zadd(DUE_INDEX, {"1:a": NOW})
    renewal = _renewal()
    renewal.begin("task-1", "1:a")
    assert renewal.renew(redis_client, {"task-1": ["1:a"], "task-2": ["1:a"]}) == 1

    assert renewal.renew(redis_client, {"task-2": ["1:a"]}) == 1
    assert renewal.renew(redis_client, {}) == 0
    assert redis_client.zscore(DUE_INDEX, "1:a") == NOW + LEASE


def test_no_renewal_lands_after_a_rotation_wrote_its_due_time(redis_client: redis.Redis) -> None:
    """Renewals race rotations that begin and then write a due time sooner than the lease
    (a retry a few seconds away): none of those writes is ever overwritten."""
    now = time.time()
    ids = [f"1:{index}" for index in range(300)]
    redis_client.zadd(DUE_INDEX, dict.fromkeys(ids, now))
    renewal = ClaimRenewal(3600)
    done = threading.Event()

    def renew_all_the_time() -> None:
        while not done.is_set():
            renewal.renew(redis_client, {"task-1": ids})

    renewer = threading.Thread(target=renew_all_the_time)
    renewer.start()
    try:
        for credential_id in ids:
            renewal.begin("task-1", credential_id)
            redis_client.zadd(DUE_INDEX, {credential_id: now + 5})  # the rotation's write
    finally:
        done.set()
        renewer.join()

    overwritten = [i for i in ids if redis_client.zscore(DUE_INDEX, i) != pytest.approx(now + 5)]
    assert overwritten == []


ACCESS_TTL = 30
USERS = 100
THREADS = 4
REFRESH_CHUNK = int(SETTINGS["REFRESH_CHUNK"].default)


@pytest.fixture
def sandbox(client_secret: str) -> Iterator[Sandbox]:
    config = SandboxConfig(client_id=CLIENT_ID, client_secret=client_secret, access_ttl=ACCESS_TTL)
    with Sandbox(config) as running:
        yield running


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """Tokens of 30 s refreshed 25 s ahead; CLAIM_LEASE is left at its default."""
    return {
        **env,
        "ACCESS_REFRESH_MARGIN": "25",
        "SCAN_INTERVAL": "1",
        "HTTP_TIMEOUT": "5",
        "COMMIT_RETRY_SECONDS": "2",
        "LOCK_TTL": "8",
        "WORKER_CONCURRENCY": str(THREADS),
    }


def _rotations(sandbox: Sandbox) -> dict[str, int]:
    return {f"{g['team_id']}:{g['user_id']}": g["rotations"] for g in sandbox.grants()}


def _expired(sandbox: Sandbox) -> set[str]:
    now = time.time()
    return {
        f"{g['team_id']}:{g['user_id']}"
        for g in sandbox.grants()
        if not g["lost"] and g["access_expires_at"] <= now
    }


def _received(service: ServiceProcesses, worker: str) -> int:
    """How many scheduled refresh tasks ``worker`` has taken from the queue."""
    received = r"Task tasks\.refresh\.refresh_due\[\S+\] received"
    return len(re.findall(received, service.log_text(worker)))


def _due_all_at_once(vault: Vault, ids: list[str], settings: Settings) -> None:
    """Due in the same second, for one tick to claim them all: the first second in which a
    rotation finds every one of them due (within the margin and its jitter)."""
    jitter = settings.access_refresh_margin * JITTER_FRACTION
    due = time.time() + ACCESS_TTL - settings.access_refresh_margin - jitter + 1
    vault.redis.zadd(DUE_INDEX, dict.fromkeys(ids, due))


@pytest.mark.slow
def test_the_work_a_killed_worker_held_is_rotated_again_within_its_lease(
    sandbox: Sandbox, vault: Vault, env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL a worker while its threads wait inside Miro's token calls and its tasks hold
    the rest: a hundred credentials in four running tasks and three it has reserved."""
    settings = Settings.from_env(env)
    service = ServiceProcesses(env, tmp_path / "logs")
    try:
        first = service.worker("w1", concurrency=THREADS)
        service.beat()
        service.wait_ready("w1")
        stored = vault.import_many(sandbox.create_grants(USERS))
        sandbox.set_faults(hold=True)
        _due_all_at_once(vault, [str(credential.id) for credential in stored], settings)
        wait_for(
            lambda: (
                sandbox.stats()["held"] == THREADS
                and vault.redis.zcount(DUE_INDEX, "-inf", time.time()) == 0
                and _received(service, "w1") == len(chunked(stored, THREADS, REFRESH_CHUNK))
            ),
            timeout=settings.http_timeout + ACCESS_TTL - settings.access_refresh_margin,
            message="every credential claimed, and each thread of w1 inside a call to Miro",
        )

        service.stop(first, signal.SIGKILL)
        killed_at = time.time()
        sandbox.set_faults(hold=False)  # Miro answers the dead worker's calls to nobody
        wait_for(lambda: sandbox.stats()["token_in_flight"] == 0, message="the held calls")
        before = _rotations(sandbox)
        lost = {key for key, count in before.items() if count}  # rotated, answer undelivered
        assert len(lost) == THREADS
        service.worker("w2", concurrency=THREADS)
        expired: set[str] = set()

        def all_rotated_again() -> bool:
            expired.update(_expired(sandbox))
            after = _rotations(sandbox)
            return all(after[key] > before[key] for key in after if key not in lost)

        deadline = settings.claim_lease + 2 * settings.scan_interval + settings.http_timeout + 3
        wait_for(all_rotated_again, timeout=deadline, message="the dead worker's work rotated")
    finally:
        service.stop_all()

    assert expired == set()
    assert time.time() - killed_at < ACCESS_TTL
    assert sandbox.stats()["reused_refresh_tokens"] == 0


@pytest.mark.slow
def test_a_task_running_longer_than_the_lease_keeps_its_tail_claimed(
    sandbox: Sandbox, vault: Vault, env: dict[str, str], tmp_path: Path
) -> None:
    """One task of eight credentials, one second each at Miro, under a lease of four: its
    tail is not handed out again while it runs (a second thread is free to take it)."""
    env = {**env, "CLAIM_LEASE": "4", "ACCESS_REFRESH_MARGIN": "16", "WORKER_CONCURRENCY": "1"}
    service = ServiceProcesses(env, tmp_path / "logs")
    try:
        service.worker("w1", concurrency=2)
        service.beat()
        service.wait_ready("w1")
        sandbox.set_faults(latency_ms=1000)
        due_now = [{**grant, "expires_in": 17} for grant in sandbox.create_grants(8)]
        ids = [str(credential.id) for credential in vault.import_many(due_now)]
        vault.redis.zadd(DUE_INDEX, dict.fromkeys(ids, time.time()))

        wait_for(
            lambda: all(count == 1 for count in _rotations(sandbox).values()),
            timeout=20,
            message="each credential rotated",
        )
    finally:
        service.stop_all()

    assert vault.redis.hgetall(OUTCOME_COUNTERS) == {b"rotated": b"8"}
    assert _received(service, "w1") == 1
