"""The scan task that beat sends every SCAN_INTERVAL seconds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from functools import cache
from typing import Any

from celery import Task

from settings import get_settings
from tasks import vault
from tasks.refresh import refresh_due, rotate
from worker.celery import app
from worker.scan import Scanner, chunked


@cache
def scanner() -> Scanner:
    settings = get_settings()
    return Scanner(
        vault().redis,
        vault().rotator.guard,
        settings.scan_batch,
        settings.claim_lease,
        start_rate=settings.miro_token_rate,
    )


def _backlog() -> int:
    """At most how many credentials wait in refresh tasks not yet taken by a worker.

    Counted as messages times REFRESH_CHUNK (a message holds up to that many): erring high
    only makes a tick claim less. Asked on a pooled broker connection: opening one per tick
    cost more than the whole rest of an idle tick.
    """
    with app.pool.acquire(block=True) as connection:
        waiting = int(connection.default_channel.client.llen(app.conf.task_default_queue))
    return waiting * get_settings().refresh_chunk


def _publish(task: Task, arguments: Sequence[tuple[object, ...]]) -> None:
    """Queue one task per argument tuple through one producer, as one pipelined batch.

    A tick's messages cost one Redis round trip instead of two each. Inside the batch a
    publish only buffers, so Celery's per-message retry wrapper is skipped (``retry=False``):
    the flush is what can fail, it raises, and the claims the tick took come back when their
    lease runs out.
    """
    if not arguments:
        return
    with app.producer_or_acquire() as producer, producer.batch():
        for args in arguments:
            task.apply_async(args, producer=producer, retry=False)


def _enqueue(ids: Sequence[str]) -> None:
    settings = get_settings()
    chunks = chunked(ids, spread=settings.worker_concurrency, most=settings.refresh_chunk)
    _publish(refresh_due, [(chunk,) for chunk in chunks])


def _enqueue_probe(ids: Sequence[str]) -> None:
    _publish(rotate, [(credential_id,) for credential_id in ids])


@app.task(name="tasks.scan.scan", ignore_result=True)
def scan() -> dict[str, Any]:
    """Claim the credentials that are due and queue one refresh each."""
    vault().recover()
    return asdict(scanner().tick(_enqueue, _enqueue_probe, backlog=_backlog()))
