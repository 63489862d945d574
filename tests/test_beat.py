"""Beat's scan, in a real ``celery -A worker beat`` over a real Redis and no worker: what it
queues is read straight from the refresh queue, message by message."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from settings import Settings
from soak.processes import ROOT, ServiceProcesses
from soak.support import free_port
from tests.conftest import wait_for
from worker.constants import DUE_INDEX, REFRESH_QUEUE
from worker.redis_server import RedisServer
from worker.sandbox import Sandbox
from worker.vault import Vault

pytestmark = pytest.mark.slow

#: Beat needs the store, never the Miro app.
NO_APP = {"MIRO_CLIENT_ID": "", "MIRO_CLIENT_SECRET": "", "MIRO_REDIRECT_URI": ""}


@pytest.fixture
def service(env: dict[str, str], tmp_path: Path, redis_client: redis.Redis) -> Iterator[Any]:
    processes = ServiceProcesses({**env, **NO_APP}, tmp_path / "logs")
    yield processes
    processes.stop_all()


def queued(client: redis.Redis) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """Task name, args and kwargs of each message waiting in the refresh queue, oldest first."""
    messages = []
    for raw in reversed(client.lrange(REFRESH_QUEUE, 0, -1)):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        messages.append((message["headers"]["task"], args, kwargs))
    return messages


def _due_now(sandbox: Sandbox, vault: Vault, count: int) -> list[str]:
    grants = [{**grant, "expires_in": 60} for grant in sandbox.create_grants(count)]
    return [str(credential.id) for credential in vault.import_many(grants)]


def _queued_ids(client: redis.Redis) -> list[str]:
    return [i for _, _, kwargs in queued(client) for i in kwargs.get("credential_ids", [])]


def test_beat_queues_each_due_credential_once_by_id_and_no_scan_task(
    service: Any, sandbox: Sandbox, vault: Vault, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    due = _due_now(sandbox, vault, 3)
    service.beat()
    service.beat("beat2")  # a second beat claims none of what the first one queued

    wait_for(lambda: len(_queued_ids(redis_client)) == 3, 20, "beat to queue the due ones")

    messages = queued(redis_client)
    assert {name for name, _, _ in messages} == {"tasks.refresh.refresh_due"}
    assert all(args == [] for _, args, _ in messages)  # by keyword: Flower shows its name
    assert sorted(_queued_ids(redis_client)) == sorted(due)
    assert redis_client.keys("mtk:scan*") == []
    assert redis_client.zcount(DUE_INDEX, "-inf", "+inf") == 3  # claimed, never dropped
    for where in (Path(env["DATA_DIR"]), ROOT):
        assert list(where.glob("celerybeat-schedule*")) == []  # beat keeps no schedule file
    assert "Sending due task" not in service.log_text("beat")


def _queue_reads(client: redis.Redis) -> int:
    """LLEN calls so far: beat reads the queue's depth at every scan."""
    return int(client.info("commandstats").get("cmdstat_llen", {}).get("calls", 0))


def test_beat_leaves_no_more_queued_than_the_workers_start_within_half_a_lease(
    sandbox: Sandbox, vault: Vault, redis_client: redis.Redis, env: dict[str, str], tmp_path: Path
) -> None:
    """2 rotations a second, a lease of 5 s: 5 credentials may wait in the queue, no more, at
    any number of scans (the queue's depth counted in every one)."""
    limited = {**env, "MIRO_TOKEN_RATE": "2", "CLAIM_LEASE": "5", "REFRESH_CHUNK": "1"}
    service = ServiceProcesses(limited, tmp_path / "logs")
    due = _due_now(sandbox, vault, 30)
    try:
        service.beat()
        wait_for(lambda: redis_client.llen(REFRESH_QUEUE) == 5, 20, "the first scan's five")
        reads = _queue_reads(redis_client)
        wait_for(lambda: _queue_reads(redis_client) > reads + 8, 20, "a few more scans")
    finally:
        service.stop_all()

    assert len(_queued_ids(redis_client)) == 5
    assert set(_queued_ids(redis_client)) <= set(due)


def test_a_paused_beat_queues_one_forced_rotation_as_its_probe(
    service: Any, sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    due = _due_now(sandbox, vault, 3)
    vault.rotator.guard.pause("a test incident")
    service.env["PROBE_INTERVAL"] = "3600"  # one probe in this test's time
    service.beat()

    wait_for(lambda: queued(redis_client), 20, "the probe")
    reads = _queue_reads(redis_client)
    wait_for(lambda: _queue_reads(redis_client) > reads + 8, 20, "a few more scans")

    [(name, args, kwargs)] = queued(redis_client)
    assert (name, args) == ("tasks.refresh.rotate", [])
    assert kwargs["credential_id"] in due


def test_beat_rides_out_a_redis_restart_and_scans_on(
    sandbox: Sandbox, env: dict[str, str], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis", free_port()).start()
    env = {**env, **NO_APP, "REDIS_URL": server.url}
    service = ServiceProcesses(env, tmp_path / "logs")
    client = redis.Redis.from_url(server.url)
    try:
        beat = service.beat()
        wait_for(lambda: "beat: Starting" in service.log_text("beat"), 20, "beat to start")
        wait_for(lambda: _queue_reads(client) >= 2, 20, "beat's first scans")
        server.kill()
        wait_for(lambda: "scan failed: ConnectionError" in service.log_text("beat"), 20, "a miss")
        server.start()
        due = _due_now(sandbox, Vault.from_settings(Settings.from_env(env)), 2)
        wait_for(lambda: sorted(_queued_ids(client)) == sorted(due), 30, "beat to scan again")
        assert beat.poll() is None
    finally:
        service.stop_all()
        client.close()
        server.stop()
    assert "Traceback" not in service.log_text("beat")
