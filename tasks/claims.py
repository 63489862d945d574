"""A worker step that renews the claims of the credentials this worker holds.

See :mod:`worker.claims`. What the worker holds is Celery's own account of it: every task it
has reserved or is running, until the task is done (``celery.worker.state.requests``). Of a
scheduled refresh task, the credentials whose rotation has not begun are renewed; the rotator
tells when one begins. The renewal runs in a thread of its own every quarter of
``CLAIM_LEASE``, off the consumer's event loop, and goes on until the process ends: through a
warm shutdown, the tasks still running keep their claims.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial

from celery import bootsteps, current_task
from celery.worker import WorkController, state

from settings import get_settings
from tasks import beginnings, vault
from tasks.messages import due_ids
from tasks.refresh import refresh_due
from worker.celery import app
from worker.claims import ClaimRenewal
from worker.credential import CredentialId

log = logging.getLogger(__name__)


class ClaimRenewalStep(bootsteps.StartStopStep):
    """Renews, in a daemon thread, the claims this worker's scheduled refresh tasks hold."""

    def start(self, worker: WorkController) -> None:
        renewal = ClaimRenewal(get_settings().claim_lease)
        beginnings.append(partial(_begin_in_current_task, renewal))
        thread = threading.Thread(target=_renew_forever, args=(renewal,), name="claim-renewal")
        thread.daemon = True
        thread.start()


def held_claims() -> dict[str, list[str]]:
    """The credential ids of each scheduled refresh task this worker holds, by task id."""
    requests = dict(state.requests)  # one copy in one step: the consumer adds to it meanwhile
    return {
        task_id: due_ids(request.args, request.kwargs)
        for task_id, request in requests.items()
        if request.name == refresh_due.name
    }


def _begin_in_current_task(renewal: ClaimRenewal, credential_id: CredentialId) -> None:
    """A rotation of the task this thread runs begins; outside a task, nothing is held."""
    task_id = current_task.request.id if current_task else None
    if task_id:
        renewal.begin(task_id, str(credential_id))


def _renew_forever(renewal: ClaimRenewal) -> None:
    """Renew every interval; a failure is logged, and the claims it missed last a lease."""
    while True:
        time.sleep(renewal.interval)
        try:
            renewal.renew(vault().redis, held_claims())
        except Exception:
            log.exception("claims not renewed; each comes due again at the end of its lease")


app.steps["worker"].add(ClaimRenewalStep)
