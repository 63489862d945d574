"""The vault the tasks share: built once per process, at the worker's start."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

import tasks
from settings import get_settings
from soak.processes import ServiceProcesses
from tests.conftest import ROOT, wait_for
from worker.journal import Journal, JournalEntry
from worker.record import encode
from worker.sandbox import Sandbox
from worker.secret import Secret
from worker.vault import Vault

THREADS = 16


@pytest.fixture
def fresh_process_vault(
    env: dict[str, str], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The settings of ``env`` in ``os.environ``, and no vault built yet in this process."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    tasks._process_vault.forget()
    yield
    tasks._process_vault.forget()
    get_settings.cache_clear()


@pytest.mark.usefixtures("fresh_process_vault")
def test_threads_asking_at_once_for_the_first_time_share_one_vault() -> None:
    """Under the threads pool, the first tasks may all start at once."""
    barrier = threading.Barrier(THREADS)
    built: list[Vault] = []

    def first_task() -> None:
        barrier.wait()
        built.append(tasks.vault())

    threads = [threading.Thread(target=first_task) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(built) == THREADS
    assert len({id(vault) for vault in built}) == 1
    assert tasks.vault() is built[0]


@pytest.mark.slow
def test_a_threads_worker_builds_its_vault_as_it_starts(
    sandbox: Sandbox, vault: Vault, env: dict[str, str], tmp_path: Path
) -> None:
    """Building the vault replays the journal: a pair spilled before the start is stored
    long before the journal's own replay (every SCAN_INTERVAL) or any task."""
    stored = vault.import_response(sandbox.create_grants(1)[0])
    rotated = replace(stored, access_token=Secret("rotated"), version=2)
    journal = Journal(Path(env["DATA_DIR"]))
    journal.spill(JournalEntry(str(stored.id), "1", encode(rotated, vault.store.cipher), None))
    service = ServiceProcesses({**env, "SCAN_INTERVAL": "120"}, tmp_path / "logs")
    try:
        service.worker()
        service.wait_ready()

        wait_for(lambda: not journal.pending(), timeout=20, message="the journal replayed")
    finally:
        service.stop_all()
    assert vault.store.load(stored.id) == rotated


def test_a_worker_without_the_miro_app_refuses_to_start_in_one_line(env: dict[str, str]) -> None:
    """It would fail every due rotation; beat, Flower, the web page and the CLI have rules of
    their own."""
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "-l", "INFO"],
        env={**os.environ, **env, "MIRO_CLIENT_SECRET": "", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr  # (Celery warns a root user first: no error)
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: MIRO_CLIENT_SECRET is not set; copy it from your Miro app")
