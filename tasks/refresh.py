"""Refresh tasks: the scheduled one beat's scan queues, and the forced one operators call.

Start a forced rotation from anywhere that speaks Celery, e.g.
``celery -A worker call tasks.refresh.rotate --args='["<team_id>:<user_id>"]'`` or Flower's
``POST /api/task/async-apply/tasks.refresh.rotate``. Arguments come from whoever sends the
message, so each is checked: a wrong one fails the task with a message that names it, instead
of quietly rotating nothing.
"""

from __future__ import annotations

from typing import Any

from tasks import vault
from worker.celery import app
from worker.credential import CredentialId, InvalidCredentialId


@app.task(name="tasks.refresh.refresh_due", ignore_result=True)
def refresh_due(credential_ids: list[str]) -> dict[str, list[str]]:
    """Rotate each of these credentials that is still due; the scan claimed them for us.

    Returns the ids by outcome, e.g. ``{"rotated": [...], "rescheduled": [...]}``: what
    Flower shows and the worker logs (each failure's detail is in the log's warning).
    """
    if not isinstance(credential_ids, list):
        raise TypeError("tasks.refresh.refresh_due takes one argument: a list of credential ids")
    ids = [_credential_id(credential_id) for credential_id in credential_ids]
    by_outcome: dict[str, list[str]] = {}
    for result in vault().rotator.rotate_due(ids):
        by_outcome.setdefault(result.outcome.value, []).append(result.credential_id)
    return by_outcome


@app.task(name="tasks.refresh.rotate")
def rotate(credential_id: str, seen_version: int | None = None) -> dict[str, Any]:
    """Rotate now, fresh or not (a leaked token, an incident).

    ``seen_version`` is the version the requester saw; any rotation committed since
    satisfies the request, so a thousand clicks on one credential make one refresh.
    """
    result = vault().rotate_now(_credential_id(credential_id), seen_version=_seen(seen_version))
    return result.as_dict()


def _credential_id(value: object) -> CredentialId:
    if not isinstance(value, str):
        raise InvalidCredentialId(
            f'a credential id is a string "<team_id>:<user_id>", not {type(value).__name__}'
        )
    return CredentialId.parse(value)


def _seen(value: object) -> int | None:
    """``seen_version``, checked: one below every real version would rotate nothing."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    shown = value if isinstance(value, int) else type(value).__name__
    raise ValueError(
        "tasks.refresh.rotate: seen_version must be a non-negative integer (the version the "
        f"requester saw) or null (the version now), not {shown}"
    )
