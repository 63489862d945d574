"""Forced rotations queued for the workers, from the CLI and from the console."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.credential import CredentialId

if TYPE_CHECKING:
    from celery.result import AsyncResult

#: The Celery task of a forced rotation (tasks/refresh.py).
ROTATE_TASK = "tasks.refresh.rotate"


def queue_rotation(credential_id: CredentialId, seen_version: int | None) -> AsyncResult:
    """Queue a forced rotation, satisfied by any rotation that commits past ``seen_version``.

    The workers make the call to Miro: a web request or a command is not held for it, and
    the shared rate limit and the merging of repeated requests apply.
    """
    from worker.celery import app  # noqa: PLC0415 - the Celery app reads the settings: on use

    return app.send_task(ROTATE_TASK, args=[str(credential_id), seen_version])
