"""Refresh tasks: the scheduled one the scan queues, and the forced one operators call.

Start a forced rotation from anywhere that speaks Celery, e.g.
``celery -A worker call tasks.refresh.rotate --args='["<team_id>:<user_id>"]'`` or Flower's
``POST /api/task/async-apply/tasks.refresh.rotate``.
"""

from __future__ import annotations

from typing import Any

from tasks import vault
from worker.celery import app
from worker.credential import CredentialId


@app.task(name="tasks.refresh.refresh", ignore_result=True)
def refresh(credential_id: str) -> dict[str, Any]:
    """Rotate the credential if it is due; the scan claimed it for us."""
    return vault().rotator.rotate(CredentialId.parse(credential_id)).as_dict()


@app.task(name="tasks.refresh.rotate")
def rotate(credential_id: str, seen_version: int | None = None) -> dict[str, Any]:
    """Rotate now, fresh or not (a leaked token, an incident).

    ``seen_version`` is the version the requester saw; any rotation committed since
    satisfies the request, so a thousand clicks on one credential make one refresh.
    """
    result = vault().rotate_now(CredentialId.parse(credential_id), seen_version=seen_version)
    return result.as_dict()
