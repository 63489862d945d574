"""A worker step that replays the process's rescue journal on a timer, not only before a rotation.

A pair spilled to the journal keeps its credential's lock until Redis takes it (see
:mod:`worker.journal`); a worker with nothing to rotate would otherwise hold both until it
restarts or the lock's TTL runs out. Every ``SCAN_INTERVAL`` seconds it looks (one ``stat``)
and replays if anything waits.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.worker import WorkController

from settings import get_settings
from tasks import vault


class JournalReplay(bootsteps.StartStopStep):
    """Runs :func:`replay_pending` on the worker's timer."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: WorkController, **options: Any) -> None:
        super().__init__(worker, **options)
        self.timer_entry: Any = None

    def start(self, worker: WorkController) -> None:
        interval = get_settings().scan_interval
        self.timer_entry = worker.timer.call_repeatedly(interval, replay_pending)

    def stop(self, worker: WorkController) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()


def replay_pending() -> None:
    if vault().rotator.journal.pending():
        vault().recover()
