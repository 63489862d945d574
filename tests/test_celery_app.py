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
from worker.constants import REFRESH_QUEUE

SCAN_INTERVAL = "7.5"
CONCURRENCY = "13"

INSPECT = """
import json
import sys
from worker.celery import app
tasks_imported = sorted(name for name in sys.modules if name.split(".")[0] == "tasks")
app.loader.import_default_modules()  # what the worker and beat do as they start
conf = app.conf
with app.connection() as connection:
    transport = type(connection.transport).__module__ + "." + type(connection.transport).__name__
    uri = connection.as_uri()
print(json.dumps({
    "tasks_imported_with_the_app": tasks_imported,
    "worker_steps": sorted(f"{step.__module__}.{step.__name__}" for step in app.steps["worker"]),
    "transport": transport,
    "uri": uri,
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
    "beat_schedule": conf.beat_schedule,
    "beat_scheduler": conf.beat_scheduler,
    "queues": sorted(app.amqp.queues),
    "default_queue": conf.task_default_queue,
    "routes": conf.task_routes,
    "prefetch": conf.worker_prefetch_multiplier,
    "tasks": sorted(name for name in app.tasks if not name.startswith("celery.")),
}))
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


def test_beat_scans_in_its_own_process_with_no_schedule_of_tasks(
    app_config: dict[str, Any],
) -> None:
    assert app_config["beat_scheduler"] == "tasks.beat:ScanScheduler"
    assert app_config["beat_schedule"] == {}


def test_the_worker_consumes_one_queue_and_holds_back_no_more_than_it_can_run(
    app_config: dict[str, Any],
) -> None:
    assert app_config["queues"] == [REFRESH_QUEUE]
    assert app_config["default_queue"] == REFRESH_QUEUE
    assert app_config["routes"] is None
    assert app_config["prefetch"] == 1


def test_the_refresh_and_rotate_tasks_are_the_only_ones(app_config: dict[str, Any]) -> None:
    assert app_config["tasks"] == ["tasks.refresh.refresh_due", "tasks.refresh.rotate"]


def test_the_app_imports_nothing_of_tasks_whose_steps_register_as_the_worker_loads_them(
    app_config: dict[str, Any],
) -> None:
    assert app_config["tasks_imported_with_the_app"] == []
    assert {
        "tasks.capacity.CapacityReports",
        "tasks.claims.ClaimRenewalStep",
        "tasks.journal.JournalReplay",
    } <= set(app_config["worker_steps"])


def test_a_redis_broker_gets_the_shared_client_transport_and_reads_as_its_url(
    app_config: dict[str, Any], redis_server: Any
) -> None:
    assert app_config["transport"] == "worker.broker.RedisTransport"
    # Flower picks its client for the Broker page by this URL's scheme.
    assert app_config["uri"] == redis_server.url.replace("redis://", "redis://:**@")


def test_flower_beyond_localhost_without_a_login_is_refused(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.delenv("FLOWER_BASIC_AUTH_FILE", raising=False)

    result = run_cli(env, "flower", "--address", "0.0.0.0", "--port", "1")

    assert result.returncode == 1
    assert "FLOWER_BASIC_AUTH" in result.stderr
    assert result.stderr.strip().startswith("error: ")
