"""Celery signals the service sends, for integrators who run code inside the worker."""

from __future__ import annotations

from celery.utils.dispatch import Signal

from worker.outcomes import StateChange

#: Sent when a credential changes state (``needs_reauth``, back to ``active``, ...), with
#: keyword arguments ``credential``, ``old``, ``new`` and ``error``.
credential_state_changed = Signal(name="credential_state_changed")


def send_state_changed(change: StateChange) -> None:
    credential_state_changed.send(
        sender=None,
        credential=change.credential_id,
        old=change.old.value,
        new=change.new.value,
        error=change.error,
    )
