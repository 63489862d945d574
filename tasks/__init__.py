"""The Celery edge that runs in the worker and beat processes, and the vault they share.

``worker/`` is the domain and never imports this package; these modules import it and stay
thin. Each registers itself on the app of :mod:`worker.celery`, which names them: the tasks
(``refresh``, their messages read by ``messages``), the worker's steps (``journal``,
``capacity``, ``claims``) and beat's scheduler, which runs the scan (``beat``). ``signals``
holds the signals integrators connect to.

Task arguments are credential ids, results are outcomes; no token ever enters a message,
a result or an event.
"""

from __future__ import annotations

import os
import threading

from celery.signals import worker_init, worker_process_init

from settings import SettingsError, get_settings
from tasks.signals import send_state_changed
from worker.miro import APP_CREDENTIALS
from worker.rotation import Beginning
from worker.vault import Vault

#: Told as each rotation of a scheduled task begins, in the process's vault: the worker's
#: claim renewal (``tasks/claims.py``) adds itself as it starts, whether or not the vault can
#: be built yet.
beginnings: list[Beginning] = []


class _ProcessVault:
    """The vault of this process, built once however many threads ask for it first."""

    _building: threading.Lock
    _vault: Vault | None

    def __init__(self) -> None:
        self.forget()

    def get(self) -> Vault:
        built = self._vault
        if built is None:
            with self._building:  # the others wait for the one thread that builds it
                if self._vault is None:
                    self._vault = _build()
                built = self._vault
        return built

    def forget(self) -> None:
        """Build anew on the next call: a forked process must not use its parent's sockets."""
        self._building = threading.Lock()
        self._vault = None


def _build() -> Vault:
    built = Vault.from_settings(get_settings())
    built.listeners.append(send_state_changed)
    built.rotator.beginning = beginnings
    return built


_process_vault = _ProcessVault()
os.register_at_fork(after_in_child=_process_vault.forget)


def vault() -> Vault:
    """The process's vault, shared by its threads (replays the journal when first built)."""
    return _process_vault.get()


@worker_init.connect
def _refuse_without_miro_app(**_: object) -> None:
    """A worker without the Miro app would fail every rotation: it does not start at all.

    Raised as ``SystemExit``, which Celery's signal passes on (it logs any other error and
    carries on): the worker exits 1 with the line the commands print.
    """
    try:
        get_settings().require_miro_app(APP_CREDENTIALS)
    except SettingsError as error:
        raise SystemExit(f"error: {error}") from None


@worker_init.connect
@worker_process_init.connect
def _open_vault(**_: object) -> None:
    """Build the vault as the worker starts, before any task.

    ``worker_init`` comes with every pool (the threads pool's tasks run in the worker's own
    process); ``worker_process_init`` only in each process a forking pool starts.
    """
    vault()
