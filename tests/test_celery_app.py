"""The Celery app that ``celery -A worker`` finds, inspected in a fresh process.

``worker.celery`` reads the settings once, at import; a fresh interpreter imports it with the
test environment whatever other tests imported before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli, run_python
from worker.constants import REFRESH_QUEUE, SCAN_QUEUE

SCAN_INTERVAL = "7.5"
CONCURRENCY = "13"

INSPECT = """
import json
from worker.celery import app
app.loader.import_default_modules()
conf = app.conf
with app.connection() as connection:
    channel = connection.default_channel
    first = channel._create_client()
    shared = first is channel._create_client()
    channel._pool = None  # as after a reconnect
    renewed = channel._create_client() is not first
print(json.dumps({
    "client_shared": shared,
    "client_renewed_with_its_pool": renewed,
    "broker": conf.broker_url,
    "backend": conf.result_backend,
    "task_serializer": conf.task_serializer,
    "result_serializer": conf.result_serializer,
    "accept_content": list(conf.accept_content),
    "worker_pool": conf.worker_pool,
    "worker_concurrency": conf.worker_concurrency,
    "worker_send_task_events": conf.worker_send_task_events,
    "task_send_sent_event": conf.task_send_sent_event,
    "task_track_started": conf.task_track_started,
    "beat_schedule": {
        name: {"task": entry["task"], "schedule": entry["schedule"]}
        for name, entry in conf.beat_schedule.items()
    },
    "queues": sorted(queue.name for queue in conf.task_queues),
    "default_queue": conf.task_default_queue,
    "routes": conf.task_routes,
    "prefetch": conf.worker_prefetch_multiplier,
    "tasks": sorted(name for name in app.tasks if not name.startswith("celery.")),
}))
"""

BROKER_LOST = """
from kombu.common import ignore_errors
from worker.celery import app
connection = app.connection_for_read()
queue = connection.SimpleQueue("broker-lost")
queue.put({"n": 1})
queue.get(timeout=5)  # delivered, never acked: its ack failed with the broker gone
# What Connection.collect() leaves after a lost broker when closing the channel failed (a BRPOP
# in flight on the dead socket): the channel open, its transport detached.
connection._do_close_transport()
ignore_errors(connection, connection.close)  # as Celery's consumer does before reconnecting
print("closed")
"""


@pytest.fixture(scope="module")
def app_config(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    environ = {
        "REDIS_URL": redis_server.url,
        "SCAN_INTERVAL": SCAN_INTERVAL,
        "WORKER_CONCURRENCY": CONCURRENCY,
        "DATA_DIR": str(tmp_path_factory.mktemp("celery-var")),
    }
    result = run_python(environ, "-c", INSPECT)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    assert not (Path(environ["DATA_DIR"]) / "redis.start.lock").exists()  # no embedded Redis
    return config


def test_broker_and_backend_are_the_configured_redis(
    app_config: dict[str, Any], redis_server: Any
) -> None:
    assert app_config["broker"] == redis_server.url
    assert app_config["backend"] == redis_server.url


def test_only_json_is_serialized_and_accepted(app_config: dict[str, Any]) -> None:
    assert app_config["task_serializer"] == "json"
    assert app_config["result_serializer"] == "json"
    assert app_config["accept_content"] == ["json"]


def test_the_pool_is_threads_sized_by_worker_concurrency(app_config: dict[str, Any]) -> None:
    assert app_config["worker_pool"] == "threads"
    assert app_config["worker_concurrency"] == int(CONCURRENCY)


def test_task_events_are_on_for_flower(app_config: dict[str, Any]) -> None:
    assert app_config["worker_send_task_events"] is True
    assert app_config["task_send_sent_event"] is True
    assert app_config["task_track_started"] is True


def test_beat_runs_the_scan_every_scan_interval(app_config: dict[str, Any]) -> None:
    entries = list(app_config["beat_schedule"].values())
    assert entries == [{"task": "tasks.scan.scan", "schedule": float(SCAN_INTERVAL)}]


def test_the_scan_has_its_own_queue_and_the_worker_consumes_both(
    app_config: dict[str, Any],
) -> None:
    assert app_config["routes"] == {"tasks.scan.scan": {"queue": SCAN_QUEUE}}
    assert app_config["queues"] == sorted([REFRESH_QUEUE, SCAN_QUEUE])
    assert app_config["default_queue"] == REFRESH_QUEUE
    assert app_config["prefetch"] == 1  # a worker holds back no more than it can run


def test_the_refresh_rotate_and_scan_tasks_are_registered(app_config: dict[str, Any]) -> None:
    assert app_config["tasks"] == [
        "tasks.refresh.refresh_due",
        "tasks.refresh.rotate",
        "tasks.scan.scan",
    ]


def test_a_kombu_channel_keeps_one_redis_client_per_connection_pool(
    app_config: dict[str, Any],
) -> None:
    assert app_config["client_shared"] is True  # not one built per publish and ack
    assert app_config["client_renewed_with_its_pool"] is True


def test_a_connection_collected_after_a_lost_broker_closes_without_stopping_the_worker(
    redis_server: Any, tmp_path: Path
) -> None:
    environ = {"REDIS_URL": redis_server.url, "DATA_DIR": str(tmp_path)}

    result = run_python(environ, "-c", BROKER_LOST)

    # Before: AttributeError("'NoneType' object has no attribute 'hostname'"), which Celery
    # reports as "Unrecoverable error" and stops the worker on.
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["closed"]


def test_flower_beyond_localhost_without_a_login_is_refused(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.delenv("FLOWER_BASIC_AUTH_FILE", raising=False)

    result = run_cli(env, "flower", "--address", "0.0.0.0", "--port", "1")

    assert result.returncode == 1
    assert "FLOWER_BASIC_AUTH" in result.stderr
    assert result.stderr.strip().startswith("error: ")
