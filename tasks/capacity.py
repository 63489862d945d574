"""A worker step that publishes what the worker can do, and warns when the workers fall short.

Refresh tasks are timed through Celery's task signals, in memory (see :mod:`worker.meter`);
every ``REPORT_INTERVAL`` seconds a thread of its own publishes the worker's report to Redis
and compares the need with ``MIRO_TOKEN_RATE`` and the capacity of every worker seen. A
shortfall is logged as a warning, at most once every ``WARNING_INTERVAL`` seconds. The
worker's stop withdraws its report.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import Task, bootsteps
from celery.signals import task_postrun, task_prerun
from celery.worker import WorkController

from settings import get_settings
from tasks import vault
from tasks.messages import due_ids
from tasks.refresh import refresh_due, rotate
from worker import capacity, redis_errors
from worker.celery import app
from worker.meter import RefreshMeter
from worker.ratelimit import waited_in_this_thread

log = logging.getLogger(__name__)

#: Seconds between two warnings of a shortfall that lasts.
WARNING_INTERVAL = 300.0


def credentials_in(task: Task, args: Any, kwargs: Any) -> int:
    """How many credentials a refresh task rotates; 0 for any other task."""
    if task.name == refresh_due.name:
        return len(due_ids(args, kwargs))
    return 1 if task.name == rotate.name else 0


class TaskTimer:
    """Times each refresh task in its own thread, minus its waits for a rate-limit slot."""

    def __init__(self, meter: RefreshMeter) -> None:
        self.meter = meter
        self._started = threading.local()

    def connect(self) -> None:
        task_prerun.connect(self.started, weak=False)
        task_postrun.connect(self.finished, weak=False)

    def disconnect(self) -> None:
        task_prerun.disconnect(self.started)
        task_postrun.disconnect(self.finished)

    def started(self, task: Task, **_: Any) -> None:
        self._started.at = (time.monotonic(), waited_in_this_thread())

    def finished(self, task: Task, args: Any = None, kwargs: Any = None, **_: Any) -> None:
        started, waited = getattr(self._started, "at", (None, 0.0))
        self._started.at = (None, 0.0)
        credentials = credentials_in(task, args, kwargs)
        if started is None or not credentials:
            return
        seconds = time.monotonic() - started - (waited_in_this_thread() - waited)
        self.meter.record(seconds, credentials)


class CapacityReports(bootsteps.StartStopStep):
    """Publishes the worker's :class:`~worker.capacity.WorkerReport` from a daemon thread."""

    def __init__(self, worker: WorkController, **options: Any) -> None:
        super().__init__(worker, **options)
        self.stopping = threading.Event()
        self.timer: TaskTimer | None = None
        self.thread: threading.Thread | None = None
        self.last_warning = -WARNING_INTERVAL

    def start(self, worker: WorkController) -> None:
        settings = get_settings()
        meter = RefreshMeter(
            worker.hostname, worker.concurrency, settings.http_timeout, settings.miro_token_rate
        )
        self.timer = TaskTimer(meter)
        self.timer.connect()
        self.thread = threading.Thread(target=self._run, args=(meter,), name="capacity-reports")
        self.thread.daemon = True
        self.thread.start()

    def stop(self, worker: WorkController) -> None:
        self.stopping.set()
        if self.timer is not None:
            self.timer.disconnect()
        if self.thread is not None:  # a report published after the withdrawal would linger
            self.thread.join(timeout=capacity.REPORT_INTERVAL)
        try:
            capacity.withdraw(vault().redis, worker.hostname)
        except redis.RedisError as error:
            log.warning(
                "capacity report not withdrawn (%s); it expires on its own",
                redis_errors.describe(error),
            )

    def _run(self, meter: RefreshMeter) -> None:
        last = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                self._publish_and_check(meter, now - last)
            except redis.RedisError as error:  # Redis away: one line each time, no traceback
                log.warning("capacity report not published: %s", redis_errors.describe(error))
            except Exception:
                log.exception("capacity report failed; trying again shortly")
            last = now
            if self.stopping.wait(capacity.REPORT_INTERVAL):
                return

    def _publish_and_check(self, meter: RefreshMeter, elapsed: float) -> None:
        client = vault().redis
        capacity.publish(client, meter.report(elapsed))
        figures, gone = capacity.read_capacity(client, get_settings())
        capacity.forget(client, gone)
        shortfalls = [
            sentence
            for short, sentence in figures.shortfalls().items()
            # A worker just started is counted at its floor until it has refreshed something:
            # no warning on that alone at every start of a large deployment.
            if short == capacity.TOKEN_RATE or not figures.unmeasured_workers
        ]
        if shortfalls and time.monotonic() - self.last_warning >= WARNING_INTERVAL:
            self.last_warning = time.monotonic()
            log.warning("refresh capacity short: %s", "; ".join(shortfalls))


app.steps["worker"].add(CapacityReports)
