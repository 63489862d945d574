"""The scan task that beat sends every SCAN_INTERVAL seconds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from functools import cache
from typing import Any

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
    """Refresh tasks waiting in the default queue, not yet taken by a worker."""
    with app.connection_for_read() as connection:
        return int(connection.default_channel.client.llen(app.conf.task_default_queue))


def _enqueue(ids: Sequence[str]) -> None:
    for credential_id in ids:
        refresh.apply_async((credential_id,))


def _enqueue_probe(ids: Sequence[str]) -> None:
    for credential_id in ids:
        rotate.apply_async((credential_id,))


@app.task(name="tasks.scan.scan", ignore_result=True)
def scan() -> dict[str, Any]:
    """Claim the credentials that are due and queue one refresh each."""
    vault().recover()
    return asdict(scanner().tick(_enqueue, _enqueue_probe, backlog=_backlog()))
