"""The refresh service end to end: real ``celery worker`` and ``beat`` processes, real Redis,
the sandbox with 20-second access tokens. Slow by nature; each test runs a few cycles."""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from soak.processes import ServiceProcesses
from tests.conftest import CLIENT_ID, run_cli, run_module, wait_for
from worker.credential import CredentialId, State
from worker.journal import Journal, JournalEntry
from worker.record import encode
from worker.sandbox import Sandbox, SandboxConfig
from worker.secret import Secret
from worker.status import read_status
from worker.vault import Vault

pytestmark = pytest.mark.slow

ACCESS_TTL = 20
USERS = 30
#: The credentials an integrator's loop also uses, refreshing them on demand.
ON_DEMAND_USERS = 5


@pytest.fixture
def sandbox(client_secret: str) -> Iterator[Sandbox]:
    """A sandbox whose access tokens live 20 seconds, refreshed 16 s ahead: a cycle every ~3 s."""
    config = SandboxConfig(client_id=CLIENT_ID, client_secret=client_secret, access_ttl=ACCESS_TTL)
    with Sandbox(config) as running:
        yield running


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    return {
        **env,
        "ACCESS_REFRESH_MARGIN": "16",
        "SCAN_INTERVAL": "1",
        "CLAIM_LEASE": "8",
        "PROBE_INTERVAL": "2",
        "WORKER_CONCURRENCY": "16",
        # Above HTTP_TIMEOUT + COMMIT_RETRY_SECONDS (5 + 2): a killed worker's locks expire soon.
        "LOCK_TTL": "8",
    }


@pytest.fixture
def service(env: dict[str, str], tmp_path: Path, redis_client: redis.Redis) -> Iterator[Any]:
    processes = ServiceProcesses(env, tmp_path / "logs")
    yield processes
    processes.stop_all()


def seed(sandbox: Sandbox, vault: Vault) -> list[CredentialId]:
    """Connect USERS users; call once the worker is up, their tokens live 20 s."""
    return [vault.import_response(r).id for r in sandbox.create_grants(USERS)]


def _min_rotations(sandbox: Sandbox) -> int:
    return min(grant["rotations"] for grant in sandbox.grants())


def _expired_grants(sandbox: Sandbox) -> list[str]:
    now = time.time()
    return [
        f"{g['team_id']}:{g['user_id']}"
        for g in sandbox.grants()
        if not g["revoked"] and g["access_expires_at"] <= now
    ]


def _all_hold_current_pair(sandbox: Sandbox, vault: Vault) -> list[str]:
    """Ids whose stored refresh token is not the one the sandbox considers current."""
    wrong = []
    for grant in sandbox.grants():
        credential_id = CredentialId(grant["team_id"], grant["user_id"])
        stored = vault.store.load(credential_id)
        if stored.refresh_token != Secret(grant["refresh_token"]):
            wrong.append(str(credential_id))
    return wrong


def _use_tokens_until(
    stop: threading.Event,
    vault: Vault,
    sandbox: Sandbox,
    ids: list[CredentialId],
    errors: list[Exception],
) -> None:
    """An integrator's loop: ``token ID`` then a board call with it, over and over."""
    session = requests.Session()
    while not stop.is_set():
        try:
            for credential_id in ids[:ON_DEMAND_USERS]:
                token = vault.access_token(credential_id).reveal()
                session.get(
                    f"{sandbox.url}/v2/boards/b1",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=5,
                )
        except Exception as error:
            errors.append(error)
        stop.wait(0.2)


def test_every_credential_refreshed_before_expiry_for_several_cycles_with_two_beats(
    sandbox: Sandbox, vault: Vault, service: Any
) -> None:
    service.worker()
    service.beat("beat1")
    service.beat("beat2")  # a second beat must not enqueue anything twice
    service.wait_ready()
    seeded = seed(sandbox, vault)
    stop = threading.Event()
    errors: list[Exception] = []
    user = threading.Thread(target=_use_tokens_until, args=(stop, vault, sandbox, seeded, errors))
    user.start()
    expired_seen: list[str] = []
    deadline = time.monotonic() + 6 * ACCESS_TTL
    try:
        while _min_rotations(sandbox) < 4 and time.monotonic() < deadline:
            expired_seen += _expired_grants(sandbox)
            time.sleep(0.2)
    finally:
        stop.set()
        user.join()

    assert expired_seen == []
    assert errors == []
    assert _min_rotations(sandbox) >= 4
    stats = sandbox.stats()
    assert stats["reused_refresh_tokens"] == 0
    assert stats["expired_access_token_uses"] == 0
    service.stop_all()
    tasks = service.task_results("w1", "tasks.refresh.refresh_due")
    scheduled = [(c, outcome) for task in tasks for outcome, ids in task.items() for c in ids]
    assert len(scheduled) >= USERS
    # A credential enqueued twice would show as busy, lost_race or skipped_fresh. (The
    # integrator's on-demand refreshes make those legitimately: leave its users out.)
    on_demand = {str(cid) for cid in seeded[:ON_DEMAND_USERS]}
    outcomes = {outcome for c, outcome in scheduled if c not in on_demand}
    assert outcomes == {"rotated"}
    assert _all_hold_current_pair(sandbox, vault) == []


def test_500s_and_429s_delay_refreshes_but_lose_none(
    sandbox: Sandbox, vault: Vault, service: Any
) -> None:
    sandbox.set_faults(error_rate=0.4, rate_limit_rate=0.3, rate_limit_reset_s=1)
    service.worker()
    service.beat()
    service.wait_ready()
    seed(sandbox, vault)
    wait_for(
        lambda: sandbox.stats()["errors_injected"] >= 10 and sandbox.stats()["rate_limited"] >= 10,
        timeout=40,
        message="faults to strike",
    )
    sandbox.set_faults(error_rate=0.0, rate_limit_rate=0.0)
    wait_for(
        lambda: _min_rotations(sandbox) >= 2, timeout=40, message="every credential to rotate twice"
    )
    assert _expired_grants(sandbox) == []
    service.stop_all()  # graceful: running rotations commit, then the pairs hold still

    assert sandbox.stats()["reused_refresh_tokens"] == 0
    assert _all_hold_current_pair(sandbox, vault) == []
    assert read_status(vault).by_state == {"active": USERS}


def test_a_refused_client_secret_pauses_and_marks_nobody_dead(
    sandbox: Sandbox, vault: Vault, service: Any, env: dict[str, str]
) -> None:
    sandbox.set_faults(reject_all_refresh=True)
    service.worker()
    service.beat()
    service.wait_ready()
    seed(sandbox, vault)
    wait_for(vault.rotator.guard.paused, timeout=30, message="the service to pause")
    calls_when_paused = sandbox.stats()["token_calls"]
    wait_for(
        lambda: sandbox.stats()["token_calls"] > calls_when_paused,
        timeout=15,
        message="a probe refresh while paused",
    )
    assert read_status(vault).by_state == {"active": USERS}
    status = run_cli(env, "status")
    assert status.returncode == 1 and "paused" in status.stderr

    sandbox.set_faults(reject_all_refresh=False)
    wait_for(
        lambda: vault.rotator.guard.paused() is None,
        timeout=30,
        message="a probe to succeed and resume",
    )
    wait_for(
        lambda: _min_rotations(sandbox) >= 1,
        timeout=40,
        message="every credential to rotate after the incident",
    )
    service.stop_all()
    assert _all_hold_current_pair(sandbox, vault) == []
    assert read_status(vault).by_state == {"active": USERS}
    assert sandbox.stats()["reused_refresh_tokens"] == 0


def test_forced_rotation_by_cli_wait_all_flower_and_celery_call(
    sandbox: Sandbox, vault: Vault, service: Any, env: dict[str, str]
) -> None:
    login = f"admin:{secrets.token_urlsafe(12)}"
    service.env["FLOWER_BASIC_AUTH"] = login
    service.worker()
    _, port = service.flower()
    service.wait_ready()
    # Long-lived tokens: only the forced rotations rotate anything here.
    seeded = [
        vault.import_response({**r, "expires_in": 3599}).id for r in sandbox.create_grants(USERS)
    ]
    first, second, third = seeded[:3]

    waited = run_cli(env, "rotate", str(first), "--wait", "--json")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["outcome"] == "rotated"
    assert str(vault.store.load(first).refresh_token) == "Secret('***')"
    assert vault.store.load(first).version == 2

    everyone = run_cli(env, "rotate", "--all", "--wait")
    assert everyone.returncode == 0, everyone.stderr
    assert all(vault.store.load(cid).version >= 3 - (cid != first) for cid in seeded)

    url = f"http://127.0.0.1:{port}/api/task/async-apply/tasks.refresh.rotate"
    user, password = login.split(":")
    response = wait_for(
        lambda: _post_quietly(url, {"args": [str(second)]}, (user, password)),
        timeout=30,
        message="Flower to accept the task",
    )
    assert response.status_code == 200
    assert requests.post(url, json={"args": [str(second)]}, timeout=5).status_code == 401
    wait_for(lambda: vault.store.load(second).version == 3, message="Flower's rotation")

    result = run_module(
        env,
        "celery",
        "-A",
        "worker",
        "call",
        "tasks.refresh.rotate",
        f"--args={json.dumps([str(third)])}",
    )
    assert result.returncode == 0, result.stderr
    wait_for(lambda: vault.store.load(third).version == 3, message="celery call's rotation")
    assert sandbox.stats()["reused_refresh_tokens"] == 0
    assert vault.store.load(third).state is State.ACTIVE


def _post_quietly(url: str, body: dict[str, Any], auth: tuple[str, str]) -> Any:
    try:
        response = requests.post(url, json=body, auth=auth, timeout=5)
    except requests.ConnectionError:
        return None
    return response if response.status_code != 404 else None


def _freeze_mid_rotation(sandbox: Sandbox, vault: Vault) -> int:
    """Hold Miro's answers until some rotations are stuck inside their call to Miro.

    Returns once every token call in flight is held and every rotation that did get its
    answer has committed it, so the moment is "mid-rotation" and nothing else.
    """
    sandbox.set_faults(hold=True)

    def frozen() -> bool:
        stats = sandbox.stats()
        return (
            stats["held"] >= 1
            and stats["held"] == stats["token_in_flight"]
            and len(_all_hold_current_pair(sandbox, vault)) == 0
        )

    wait_for(frozen, timeout=30, message="rotations frozen inside their call to Miro")
    return sandbox.stats()["held"]


def test_sigterm_lets_running_rotations_finish_and_commit(
    sandbox: Sandbox, vault: Vault, service: Any
) -> None:
    worker = service.worker()
    service.beat()
    service.wait_ready()
    seed(sandbox, vault)
    held = _freeze_mid_rotation(sandbox, vault)
    worker.send_signal(signal.SIGTERM)
    wait_for(lambda: "warm shutdown" in service.log_text("w1").lower(), message="warm shutdown")
    assert worker.poll() is None  # still running: it waits for its rotations
    sandbox.set_faults(hold=False)
    assert worker.wait(timeout=30) == 0

    assert sandbox.stats()["orphaned"] == 0
    assert sandbox.stats()["refreshes"] >= held
    assert _all_hold_current_pair(sandbox, vault) == []


def test_sigkill_mid_rotation_loses_only_the_calls_miro_answered_to_nobody(
    sandbox: Sandbox, vault: Vault, service: Any
) -> None:
    worker = service.worker()
    service.beat()
    service.wait_ready()
    seeded = seed(sandbox, vault)
    _freeze_mid_rotation(sandbox, vault)
    worker.kill()
    worker.wait()
    held = sandbox.stats()["held"]  # counted once the dead worker can add no more
    sandbox.set_faults(hold=False)  # Miro finishes the rotations of the dead worker
    wait_for(lambda: sandbox.stats()["token_in_flight"] == 0, message="the held calls to finish")
    # Calls that timed out while frozen are orphaned too: at least the held ones are.
    assert sandbox.stats()["orphaned"] >= held, (held, sandbox.stats())
    lost = {f"{g['team_id']}:{g['user_id']}" for g in sandbox.grants() if g["lost"]}
    service.worker("w2")  # a restarted worker takes over, locks and all
    rotations_before = {str(cid): _rotations(sandbox, cid) for cid in seeded}

    def recovered() -> bool:
        """Every other credential rotated twice more; the lost ones were found out."""
        return all(
            _found_out(vault, cid)
            if str(cid) in lost
            else _rotations(sandbox, cid) >= rotations_before[str(cid)] + 2
            for cid in seeded
        )

    wait_for(recovered, timeout=90, message="the service to take over after the kill")
    service.stop_all()

    assert len(lost) >= held
    assert set(_all_hold_current_pair(sandbox, vault)) == lost
    assert sandbox.stats()["reused_refresh_tokens"] == 0


def _found_out(vault: Vault, credential_id: CredentialId) -> bool:
    """Refused once (being confirmed) or given up: never mistaken for valid."""
    stored = vault.store.load(credential_id)
    return stored.refusals >= 1 or stored.state is State.NEEDS_REAUTH


def _rotations(sandbox: Sandbox, credential_id: CredentialId) -> int:
    grant = sandbox.grant(credential_id.team_id, credential_id.user_id)
    assert grant is not None
    return int(grant["rotations"])


def test_an_idle_worker_replays_a_pair_spilled_to_its_journal(
    sandbox: Sandbox, vault: Vault, service: Any, env: dict[str, str]
) -> None:
    stored = vault.import_response(sandbox.create_grants(1)[0])
    vault.store.schedule(stored.id, time.time() + 3600)  # nothing to rotate: the worker idles
    service.worker()
    service.wait_ready()
    rotated = replace(stored, access_token=Secret("rotated"), version=2)
    entry = JournalEntry(str(stored.id), "1", encode(rotated, vault.store.cipher), None)
    journal = Journal(Path(env["DATA_DIR"]))
    journal.spill(entry)  # after its start, whose replay it missed

    wait_for(lambda: not journal.pending(), message="the worker to replay its journal")
    assert vault.store.load(stored.id) == rotated


def test_a_malformed_task_fails_alone_and_the_worker_carries_on(
    sandbox: Sandbox, vault: Vault, service: Any, env: dict[str, str]
) -> None:
    service.worker()
    service.wait_ready()
    credential = vault.import_response({**sandbox.create_grants(1)[0], "expires_in": 3599})
    for hostile in ("*:*", "1:2:3", "../..:x", "x" * 5000):
        sent = run_module(
            env, "celery", "-A", "worker", "call", "tasks.refresh.rotate",
            f"--args={json.dumps([hostile])}",
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
    wait_for(
        lambda: service.log_text("w1").count("InvalidCredentialId") >= 4,
        message="the hostile tasks to fail",
    )
    assert run_cli(env, "rotate", str(credential.id), "--wait").returncode == 0
    assert vault.store.load(credential.id).version == 2
    assert list(vault.store.ids()) == [credential.id]
