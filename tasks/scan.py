"""The scan task that beat sends every SCAN_INTERVAL seconds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from functools import cache
from typing import Any

from celery import Task

from settings import get_settings
from tasks import vault
from tasks.refresh import refresh, rotate
from worker.celery import app
from worker.scan import Scanner


@cache
def scanner() -> Scanner:
    settings = get_settings()
    return Scanner(vault().redis, vault().rotator.guard, settings.scan_batch, settings.claim_lease)


def _backlog() -> int:
    """Refresh tasks waiting in the default queue, not yet taken by a worker.

    Asked on a pooled broker connection: opening one per tick cost more than the whole rest
    of an idle tick.
    """
    with app.pool.acquire(block=True) as connection:
        return int(connection.default_channel.client.llen(app.conf.task_default_queue))


def _publish(task: Task, ids: Sequence[str]) -> None:
    """Queue one task per id through one producer, as one pipelined batch of Redis commands.

    Each task is still its own message with its own task-sent event (Flower shows each
    credential), but a thousand of them cost one round trip instead of two thousand. Inside
    the batch a publish only buffers, so Celery's per-message retry wrapper is skipped
    (``retry=False``): the flush is what can fail, it raises, and the claims the tick took
    come back when their lease runs out.
    """
    if not ids:
        return
    with app.producer_or_acquire() as producer, producer.batch():
        for credential_id in ids:
            task.apply_async((credential_id,), producer=producer, retry=False)


def _enqueue(ids: Sequence[str]) -> None:
    _publish(refresh, ids)


def _enqueue_probe(ids: Sequence[str]) -> None:
    _publish(rotate, ids)


@app.task(name="tasks.scan.scan", ignore_result=True)
def scan() -> dict[str, Any]:
    """Claim the credentials that are due and queue one refresh each."""
    vault().recover()
    return asdict(scanner().tick(_enqueue, _enqueue_probe, backlog=_backlog()))
