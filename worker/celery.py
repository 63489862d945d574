"""The Celery app that ``celery -A worker worker|beat|flower`` finds.

Broker and result backend default to the store's own Redis (the embedded one when REDIS_URL
is unset). The worker pool is threads: a refresh spends its time waiting on Miro, so 64
threads overlap 64 round trips at a fraction of the memory of 64 processes.
"""

from __future__ import annotations

import sys
from typing import Any

import redis
from celery import Celery
from kombu import Queue
from kombu.transport import redis as kombu_redis

from settings import get_settings
from tasks.capacity import CapacityReports
from tasks.journal import JournalReplay
from worker.constants import REFRESH_QUEUE, SCAN_QUEUE
from worker.datadir import private_process
from worker.vault import redis_url


class SharedClientChannel(kombu_redis.Channel):
    """kombu's Redis channel, with one redis-py client per channel instead of one per command.

    kombu builds a new client for every publish, every ack and every unacked-message record,
    and each build copies a table of some 170 response callbacks: profiled in a worker, that
    was 7 to 10 % of its CPU per refresh (three task events, one record, one ack). A client
    is only a handle on the channel's connection pool, safe to share between threads, so one
    is kept per pool (a fork or a reconnect makes a new pool, and with it a new client).

    Once its connection is gone, it refuses to build a pool with a connection error instead
    of kombu's AttributeError: that keeps a worker alive through a Redis restart.
    """

    _shared_client: Any = None

    def _get_pool(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            # Celery, having lost the broker, collects the connection (which detaches the
            # transport and drops the pools) and then closes it; a channel still open puts its
            # unacked messages back, which needs a pool. kombu would build one from no
            # connection at all and fail with an AttributeError, which Celery takes as
            # unrecoverable: the worker stopped for good on a Redis restart. A connection
            # error is what that close ignores; the messages stay in kombu's unacked set, and
            # a claim's lease brings their credentials back anyway.
            raise redis.ConnectionError("the broker connection is closed")
        return super()._get_pool(asynchronous=asynchronous)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client


kombu_redis.Transport.Channel = SharedClientChannel

settings = get_settings()
_url = redis_url(settings)
private_process(settings.data_dir)  # beat's schedule and Flower's history, 0600
if "flower.command" in sys.modules:  # a `celery` command line: Flower's may be the one to run
    from worker.flower import guard_flower

    guard_flower(settings)

app = Celery("worker", broker=_url, backend=_url, include=["tasks.refresh", "tasks.scan"])
app.steps["worker"].add(JournalReplay)
app.steps["worker"].add(CapacityReports)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=24 * 3600,
    # Task events for Flower: sent, started, succeeded with the outcome.
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    worker_pool="threads",
    worker_concurrency=settings.worker_concurrency,
    # The scan has a queue of its own, so it never waits behind the refreshes it queued; the
    # worker consumes both. A prefetch of one message per thread keeps what a worker holds
    # back small, so the scan (and a forced rotation) reaches a thread within one task's time.
    task_default_queue=REFRESH_QUEUE,
    task_queues=[Queue(REFRESH_QUEUE), Queue(SCAN_QUEUE)],
    task_routes={"tasks.scan.scan": {"queue": SCAN_QUEUE}},
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # A claim's lease, not broker redelivery, brings back a refresh whose worker died.
    task_acks_late=False,
    beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
    beat_schedule={
        "scan-due-credentials": {
            "task": "tasks.scan.scan",
            "schedule": settings.scan_interval,
            "options": {"expires": settings.scan_interval},
        }
    },
)
