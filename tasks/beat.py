"""Beat's scheduler, which runs the scan every ``SCAN_INTERVAL`` seconds in beat's own process.

A scan claims the credentials coming due (:class:`worker.scan.Scanner`) and queues their
refresh tasks through beat's producer, in one batch. It is no task of its own: the refreshes
are all that Flower lists, and a worker holding as many tasks as its prefetch allows cannot
delay a scan. Beat's own schedule (``beat_schedule``, empty here) still runs beside it, kept in
memory: beat writes no schedule file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import redis
from celery import Task
from celery.beat import Scheduler

from settings import get_settings
from tasks import vault
from tasks.journal import replay_pending
from tasks.messages import CREDENTIAL_IDS
from tasks.refresh import refresh_due, rotate
from worker import redis_errors
from worker.constants import REFRESH_QUEUE
from worker.scan import Scanner, TickReport, chunked

log = logging.getLogger(__name__)


class ScanScheduler(Scheduler):
    """Celery's in-memory beat scheduler, with a scan every ``SCAN_INTERVAL`` seconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.interval = get_settings().scan_interval
        self.next_scan = time.monotonic()

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Scan when its time has come, and run beat's entries; seconds until either is due.

        The scans start ``SCAN_INTERVAL`` apart, however long each takes (at once after one
        that took longer).
        """
        if time.monotonic() >= self.next_scan:
            self.next_scan = time.monotonic() + self.interval
            self._scan_logged()
        until_entry: float = super().tick(*args, **kwargs)
        return min(until_entry, max(0.0, self.next_scan - time.monotonic()))

    def scan(self) -> TickReport:
        """One scan: the journal replayed if it holds anything, the due claimed and queued."""
        replay_pending()
        return self.scanner.tick(self._enqueue, self._enqueue_probe, backlog=self._backlog())

    @cached_property
    def scanner(self) -> Scanner:
        settings = get_settings()
        return Scanner(
            vault().redis,
            vault().rotator.guard,
            settings.scan_batch,
            settings.claim_lease,
            start_rate=settings.miro_token_rate,
        )

    @property
    def info(self) -> str:
        return f"    . scan -> every {self.interval:g} s, in this process"

    def _scan_logged(self) -> None:
        """A scan that logs what went wrong instead of stopping beat: the next one tries again.

        Claims a failed scan took come due again when their lease runs out.
        """
        try:
            self.scan()
        except redis.RedisError as error:  # Redis away: one line each time, no traceback
            log.warning("scan failed: %s; trying again shortly", redis_errors.describe(error))
        except Exception:
            log.exception("scan failed; trying again shortly")

    def _backlog(self) -> int:
        """At most how many credentials wait in refresh tasks no worker has taken yet.

        Counted as messages times REFRESH_CHUNK (a message holds up to that many): erring
        high only makes a scan claim less. Celery's own queue, declared again, answers with
        its message count on any broker; a passive declare would fail on the Redis list the
        broker deletes once it is empty.
        """
        queue = self.app.amqp.queues[REFRESH_QUEUE].bind(self.producer.channel)
        return int(queue.queue_declare().message_count) * get_settings().refresh_chunk

    def _enqueue(self, ids: Sequence[str]) -> None:
        settings = get_settings()
        chunks = chunked(ids, spread=settings.worker_concurrency, most=settings.refresh_chunk)
        self._publish(refresh_due, [{CREDENTIAL_IDS: chunk} for chunk in chunks])

    def _enqueue_probe(self, ids: Sequence[str]) -> None:
        self._publish(rotate, [{"credential_id": credential_id} for credential_id in ids])

    def _publish(self, task: Task, messages: Sequence[Mapping[str, Any]]) -> None:
        """Queue one task per keyword arguments, through beat's producer, in one batch.

        A scan's messages cost one Redis round trip instead of two each. Inside the batch a
        publish only buffers, so Celery's per-message retry wrapper is skipped
        (``retry=False``): the flush is what can fail, it raises, and the claims the scan
        took come back when their lease runs out.
        """
        if not messages:
            return
        producer = self.producer
        with producer.batch():
            for kwargs in messages:
                task.apply_async(kwargs=kwargs, producer=producer, retry=False)
