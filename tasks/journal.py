"""A worker step that replays the process's rescue journal on its own, not only before a rotation.

A pair spilled to the journal keeps its credential's lock for the rest of the lock's TTL
(see :mod:`worker.journal`); a worker with nothing to rotate would otherwise leave it on disk
until it restarts, and another host would then be free to use the refresh token Miro has
already consumed. Every ``SCAN_INTERVAL`` seconds a thread of its own looks (one ``stat``)
and replays if anything waits, off the consumer's event loop, whose timer a replay stuck on
an unreachable Redis would hold up. The worker's stop replays a last time.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps
from celery.worker import WorkController

from settings import get_settings
from tasks import vault
from worker.celery import app
from worker.journal import Journal

log = logging.getLogger(__name__)


class JournalReplay(bootsteps.StartStopStep):
    """Runs :func:`replay_pending` every ``SCAN_INTERVAL`` in a daemon thread."""

    def __init__(self, worker: WorkController, **options: Any) -> None:
        super().__init__(worker, **options)
        self.stopping = threading.Event()

    def start(self, worker: WorkController) -> None:
        interval = get_settings().scan_interval
        thread = threading.Thread(target=self._run, args=(interval,), name="journal-replay")
        thread.daemon = True
        thread.start()

    def stop(self, worker: WorkController) -> None:
        self.stopping.set()
        _replay_logged()

    def _run(self, interval: float) -> None:
        while not self.stopping.wait(interval):
            _replay_logged()


def replay_pending() -> None:
    """Replay the journal if it holds anything; the stat comes first, the vault only then."""
    if Journal(get_settings().data_dir).pending():
        vault().recover()


def _replay_logged() -> None:
    """A replay that logs what went wrong instead of ending the thread (or the stop)."""
    try:
        replay_pending()
    except Exception:
        log.exception("journal replay failed; the pairs stay on disk for the next one")


app.steps["worker"].add(JournalReplay)
