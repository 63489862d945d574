"""Celery tasks: thin wrappers that hand a credential id to the vault and return its outcome.

Task arguments are credential ids, results are outcomes; no token ever enters a message,
a result or an event.
"""

from __future__ import annotations

from functools import cache

from celery.signals import worker_process_init

from settings import get_settings
from tasks.signals import send_state_changed
from worker.vault import Vault


@cache
def vault() -> Vault:
    """The process's vault, shared by its threads (replays the journal when first built)."""
    built = Vault.from_settings(get_settings())
    built.listeners.append(send_state_changed)
    return built


@worker_process_init.connect
def _open_vault(**_: object) -> None:
    vault()
