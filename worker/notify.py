"""Telling people that a credential needs its user again, or is back.

Listeners receive a :class:`~worker.outcomes.StateChange`. Two ship here: a structured log
event, and a webhook that POSTs ``{credential, state, error}``. The Celery signal is wired
in ``tasks/`` so this module stays free of Celery.
"""

from __future__ import annotations

import logging

import requests

from worker.outcomes import StateChange

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT = 5.0


def log_state_change(change: StateChange) -> None:
    log.warning(
        "credential %s: %s -> %s%s",
        change.credential_id,
        change.old,
        change.new,
        f" ({change.error})" if change.error else "",
        extra={"credential": change.credential_id, "state": change.new.value},
    )


class Webhook:
    """POSTs each change to ``NOTIFY_WEBHOOK_URL``; a failing hook is logged, never raised."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def __call__(self, change: StateChange) -> None:
        payload = {
            "credential": change.credential_id,
            "state": change.new.value,
            "error": change.error,
        }
        try:
            self.session.post(self.url, json=payload, timeout=WEBHOOK_TIMEOUT).raise_for_status()
        except requests.RequestException as error:
            log.error("webhook for %s failed: %s", change.credential_id, type(error).__name__)

    def __repr__(self) -> str:
        return "Webhook(NOTIFY_WEBHOOK_URL)"
