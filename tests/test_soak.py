"""The short chaos soak, every run: under a minute of kills, restarts and Miro faults, each kind
at least once."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from settings import Settings
from soak.chaos import ACTIONS, Stage
from soak.invariants import RETRY_PICKUP, backing_off, none_exited
from soak.processes import ServiceProcesses
from soak.runner import Sampler, SoakConfig, run
from tests.conftest import CLIENT_ID, free_port, wait_for
from worker.outcomes import Outcome
from worker.redis_server import RedisServer
from worker.sandbox import Sandbox, SandboxConfig
from worker.schedule import BACKOFF_BASE
from worker.vault import Vault


@pytest.mark.slow
def test_a_short_soak_loses_nothing(tmp_path: Path) -> None:
    verdict = run(SoakConfig(credentials=150, chaos_seconds=30, settle_seconds=60), tmp_path)
    print(verdict.table())
    assert verdict.ok, verdict.table()
    assert set(ACTIONS) <= set(verdict.chaos), "every kind of chaos ran"
    assert verdict.rotations > 500


#: Refusals alike, users leaving (twice at least), faults that make refusals (lost answers)
#: and faults that do not.
USERS_LEAVE = (
    "user revokes the app",
    "user revokes the app",
    "Miro loses answers",
    "Miro 500s",
    "SIGTERM worker",
)


@pytest.mark.slow
def test_a_short_soak_where_every_refusal_reads_alike_and_users_leave(tmp_path: Path) -> None:
    config = SoakConfig(
        credentials=100, chaos_seconds=15, settle_seconds=45, dialect="uniform", actions=USERS_LEAVE
    )
    verdict = run(config, tmp_path)
    print(verdict.table())
    assert verdict.ok, verdict.table()
    assert verdict.chaos["user revokes the app"] >= 2, verdict.chaos


def test_a_credential_is_excused_only_for_the_backoff_its_failures_earned(
    sandbox: Sandbox, vault: Vault, connect: Any
) -> None:
    failing, fine = connect(), connect()
    sandbox.set_faults(error_rate=1.0)
    for _ in range(2):
        assert vault.rotate_now(failing.id).outcome is Outcome.RESCHEDULED
    failed_at = time.time()

    # Two failures in a row: a backoff of up to 10 s (the failing set keeps whole seconds).
    longest = BACKOFF_BASE * 2 + RETRY_PICKUP
    assert backing_off(vault.store, str(failing.id), failed_at + longest - 2)
    assert not backing_off(vault.store, str(failing.id), failed_at + longest + 1)
    assert not backing_off(vault.store, str(fine.id), failed_at)


def test_a_process_that_exited_on_its_own_fails_the_verdict_by_name() -> None:
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    crashed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    crashed.wait(timeout=30)
    try:
        processes = {"w1": running, "w2": crashed}
        assert none_exited(processes, ["w1"]).ok
        check = none_exited(processes, ["w1", "w2"])
        assert not check.ok and "'w2': 3" in check.detail
    finally:
        running.kill()
        running.wait()


def test_a_sampler_that_cannot_look_fails_its_check_instead_of_passing_it_unseen(
    tmp_path: Path, client_secret: str, env: dict[str, str]
) -> None:
    an_hour_ago = lambda: time.time() - 3600  # noqa: E731
    with Sandbox(SandboxConfig(CLIENT_ID, client_secret, clock=an_hour_ago)) as sandbox:
        sandbox.create_grants(1)  # its access token expired long ago: the store is asked
        redis_server = RedisServer(tmp_path / "redis", free_port()).start()
        vault = Vault.from_settings(Settings.from_env({**env, "REDIS_URL": redis_server.url}))
        redis_server.stop()  # gone outside any excused window
        stage = Stage(
            sandbox=sandbox,
            vault=vault,
            redis=redis_server,
            service=ServiceProcesses({}, tmp_path / "logs"),
            rng=random.Random(),
            access_ttl=15,
            lock_ttl=10,
            workers=[],
        )
        sampler = Sampler(stage)
        sampler.start()
        try:
            wait_for(lambda: sampler.expired, timeout=15, message="a sample")
        finally:
            sampler.done.set()
            sampler.join()

    failure = sampler.expired[0]
    assert failure.startswith("(the sampler failed") and "ConnectionError" in failure
