"""The Celery app that ``celery -A worker worker|beat|flower`` finds.

The Celery edge inside ``worker/``: it imports only ``worker/`` and the settings. The tasks,
the worker's steps and beat's scheduler live in ``tasks/`` and are named here, never
imported: the worker imports the ``include`` modules as it starts (each registers its tasks
and steps on this app), and beat loads ``beat_scheduler``.

Broker and result backend default to the store's own Redis (the embedded one when REDIS_URL
is unset); the broker's connections are :class:`worker.broker.BrokerConnection`. The worker
pool is threads: a refresh spends its time waiting on Miro, so 64 threads overlap 64 round
trips at a fraction of the memory of 64 processes.
"""

from __future__ import annotations

import sys

from celery import Celery

from settings import get_settings
from worker.broker import AMQP
from worker.constants import REFRESH_QUEUE
from worker.datadir import private_process
from worker.vault import redis_url

settings = get_settings()
_url = redis_url(settings)
private_process(settings.data_dir)  # Flower's history and the journal, 0600
if "flower.command" in sys.modules:  # a `celery` command line: Flower's may be the one to run
    from worker.flower import guard_flower

    guard_flower(settings)

app = Celery(
    "worker",
    broker=_url,
    backend=_url,
    amqp=AMQP,
    include=["tasks.refresh", "tasks.journal", "tasks.capacity", "tasks.claims"],
)
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
    # One queue, the refreshes'. A prefetch of one message per thread keeps what a worker
    # holds back small, so a forced rotation reaches a thread within one task's time.
    task_default_queue=REFRESH_QUEUE,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # A claim's lease, not broker redelivery, brings back a refresh whose worker died: the
    # worker renews the claims it holds (tasks/claims.py), so a short lease suffices.
    task_acks_late=False,
    # Beat scans every SCAN_INTERVAL in its own process and queues only refresh tasks; it
    # keeps no schedule file.
    beat_scheduler="tasks.beat:ScanScheduler",
)
