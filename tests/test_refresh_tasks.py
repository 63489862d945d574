"""The refresh tasks as any producer sends them (``celery call``, Flower, a script): a wrong
argument fails the task with a message that names it, and nothing is rotated.

A real ``celery worker`` takes the tasks; this test's own Celery client sends them and reads
the results, as ``celery call`` and Flower do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from soak.processes import ServiceProcesses
from tests.conftest import wait_for
from worker.constants import REFRESH_QUEUE
from worker.redis_server import RedisServer
from worker.sandbox import Sandbox
from worker.vault import Vault

TASK_TIMEOUT = 30


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path, redis_client: redis.Redis) -> Iterator[Any]:
    processes = ServiceProcesses(env, tmp_path / "logs")
    processes.worker()
    processes.wait_ready()
    yield processes
    processes.stop_all()


@pytest.fixture
def producer(redis_server: RedisServer) -> Iterator[Celery]:
    client = Celery("producer", broker=redis_server.url, backend=redis_server.url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    yield client
    client.close()


def _rotate(producer: Celery, *args: object) -> Any:
    """Send ``tasks.refresh.rotate`` and wait for its outcome, success or failure."""
    sent = producer.send_task("tasks.refresh.rotate", args=list(args), queue=REFRESH_QUEUE)
    sent.get(timeout=TASK_TIMEOUT, propagate=False)
    return sent


#: ``seen_version`` values that are no version, and how the refusal names each.
NO_VERSIONS = [(-9999, "not -9999"), ("1", "not str"), (True, "not True"), (2.0, "not float")]


def test_rotate_refuses_a_seen_version_that_is_no_version(
    worker: Any, producer: Celery, vault: Vault, sandbox: Sandbox
) -> None:
    credential = vault.import_response(sandbox.create_grants(1)[0])

    refused = [_rotate(producer, str(credential.id), value) for value, _ in NO_VERSIONS]
    rotated = _rotate(producer, str(credential.id), 1)

    for (value, words), result in zip(NO_VERSIONS, refused, strict=True):
        message = str(result.result)
        assert result.state == "FAILURE", (value, message)
        assert "seen_version must be a non-negative integer" in message and words in message
    assert rotated.state == "SUCCESS" and rotated.result["outcome"] == "rotated"
    assert vault.store.load(credential.id).version == 2
    assert sandbox.stats()["token_calls"] == 1


def test_refresh_due_refuses_a_list_with_a_non_id_and_rotates_none_of_it(
    worker: Any, producer: Celery, vault: Vault, sandbox: Sandbox
) -> None:
    due = vault.import_response({**sandbox.create_grants(1)[0], "expires_in": 60})

    producer.send_task("tasks.refresh.refresh_due", args=[[str(due.id), 5]], queue=REFRESH_QUEUE)
    refused = _rotate(producer, 5)

    wait_for(
        lambda: (
            'a credential id is a string "<team_id>:<user_id>", not int' in worker.log_text("w1")
        ),
        message="refresh_due to fail",
    )
    assert refused.state == "FAILURE" and "not int" in str(refused.result)
    assert sandbox.stats()["token_calls"] == 0
    assert vault.store.load(due.id).version == 1
