"""The status report: counts, overdue, expiries, failures and health, in process and by CLI."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.test_capacity import report
from worker import capacity
from worker.constants import credential_key
from worker.credential import Credential
from worker.journal import JournalEntry
from worker.sandbox import Sandbox
from worker.status import overdue_grace, read_status, recount_states
from worker.vault import Vault


@pytest.fixture
def worker_seen(vault: Vault) -> None:
    """A worker's report, as a running worker publishes it: ample capacity, the default rate."""
    capacity.publish(vault.redis, report(token_rate=vault.settings.miro_token_rate))


def _import(sandbox: Sandbox, vault: Vault, count: int, **response: Any) -> list[Credential]:
    return [vault.import_response({**grant, **response}) for grant in sandbox.create_grants(count)]


def _refuse(sandbox: Sandbox, vault: Vault, credential: Credential) -> None:
    """The user uninstalls the app; a forced rotation finds out."""
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)
    assert vault.rotate_now(credential.id).outcome == "needs_reauth"


def test_counts_by_state_follow_the_vaults_transitions(sandbox: Sandbox, vault: Vault) -> None:
    assert read_status(vault).by_state == {}
    first, second, third = _import(sandbox, vault, 3)
    assert read_status(vault).by_state == {"active": 3}

    _refuse(sandbox, vault, first)
    status = read_status(vault)
    assert status.by_state == {"active": 2, "needs_reauth": 1}
    assert status.credentials == 3

    assert vault.revoke(second.id) is True
    assert read_status(vault).by_state == {"active": 1, "needs_reauth": 1}
    assert vault.revoke(first.id) is False  # Miro forgot it already; deleted all the same
    assert read_status(vault).by_state == {"active": 1}
    assert vault.store.delete(third.id)
    status = read_status(vault)
    assert status.by_state == {} and status.credentials == 0


def test_overdue_counts_only_entries_later_than_the_grace(
    sandbox: Sandbox, vault: Vault, worker_seen: None
) -> None:
    late, slightly_late, future = _import(sandbox, vault, 3)
    now = time.time()
    grace = overdue_grace(vault.settings)
    vault.store.schedule(late.id, now - grace - 5)
    vault.store.schedule(slightly_late.id, now - grace + 5)
    vault.store.schedule(future.id, now + 60)

    status = read_status(vault, now=now)

    assert status.overdue == 1
    assert not status.healthy
    vault.store.schedule(late.id, now - grace + 5)
    assert read_status(vault, now=now).overdue == 0
    assert read_status(vault, now=now).healthy


def test_soonest_expiries_are_those_of_the_first_due(sandbox: Sandbox, vault: Vault) -> None:
    stored = _import(sandbox, vault, 2, expires_in=3000) + _import(sandbox, vault, 1)
    now = time.time()

    status = read_status(vault, now=now)

    access = min(c.access_expires_at for c in stored if c.access_expires_at)
    refresh = min(c.refresh_expires_at for c in stored if c.refresh_expires_at)
    assert status.soonest_access_expiry_in == pytest.approx(access - now)
    assert status.soonest_refresh_expiry_in == pytest.approx(refresh - now)
    assert 2900 < (status.soonest_access_expiry_in or 0) <= 3000


def test_no_credentials_means_no_expiries(vault: Vault) -> None:
    status = read_status(vault)
    assert status.soonest_access_expiry_in is None
    assert status.soonest_refresh_expiry_in is None
    assert status.healthy


def test_failing_lists_refused_and_retrying_credentials_with_their_error(
    sandbox: Sandbox, vault: Vault
) -> None:
    refused, retrying, fine = _import(sandbox, vault, 3)
    _refuse(sandbox, vault, refused)
    sandbox.set_faults(error_rate=1.0)
    assert vault.rotate_now(retrying.id).outcome == "rescheduled"
    sandbox.set_faults(error_rate=0.0)

    rows = {row["id"]: row for row in read_status(vault).failing}

    assert set(rows) == {str(refused.id), str(retrying.id)}
    assert rows[str(refused.id)]["state"] == "needs_reauth"
    assert "refused" in rows[str(refused.id)]["last_error"]
    assert rows[str(retrying.id)]["state"] == "active"
    assert rows[str(retrying.id)]["failure_count"] == 1
    assert "HTTP 500" in rows[str(retrying.id)]["last_error"]

    assert vault.rotate_now(retrying.id).outcome == "rotated"
    assert [row["id"] for row in read_status(vault).failing] == [str(refused.id)]
    assert str(fine.id) not in rows


def test_a_pause_makes_the_service_unhealthy(
    sandbox: Sandbox, vault: Vault, worker_seen: None
) -> None:
    _import(sandbox, vault, 1)
    assert read_status(vault).healthy
    vault.rotator.guard.pause("test incident")

    status = read_status(vault)

    assert status.paused == "test incident"
    assert not status.healthy and status.as_dict()["healthy"] is False
    vault.rotator.guard.resume()
    assert read_status(vault).healthy


def test_a_pair_waiting_in_the_journal_makes_the_service_unhealthy(
    sandbox: Sandbox, vault: Vault
) -> None:
    [credential] = _import(sandbox, vault, 1)
    raw = vault.store.raw(credential.id)
    assert raw is not None
    vault.rotator.journal.spill(JournalEntry(str(credential.id), "1", raw, None))

    status = read_status(vault)

    assert status.journal_pending == 1
    assert not status.healthy


def _cli_status(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    result = run_cli(env, "status", "--json")
    return result.returncode, json.loads(result.stdout)


def _comparable(status: dict[str, Any]) -> dict[str, Any]:
    """The report without the parts that move with the clock."""
    moving = {"soonest_access_expiry_in", "soonest_refresh_expiry_in"}
    return {key: value for key, value in status.items() if key not in moving}


def test_cli_status_json_matches_and_exits_0_when_healthy(
    env: dict[str, str], sandbox: Sandbox, vault: Vault, worker_seen: None
) -> None:
    credentials = _import(sandbox, vault, 3)
    _refuse(sandbox, vault, credentials[0])

    code, printed = _cli_status(env)
    expected = read_status(vault).as_dict()

    assert code == 0
    assert printed["healthy"] is True
    assert printed["by_state"] == {"active": 2, "needs_reauth": 1}
    assert _comparable(printed) == _comparable(expected)
    for moving in ("soonest_access_expiry_in", "soonest_refresh_expiry_in"):
        assert printed[moving] == pytest.approx(expected[moving], abs=30)


def test_cli_status_exits_1_when_unhealthy(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    _import(sandbox, vault, 1)
    vault.rotator.guard.pause("test incident")

    result = run_cli(env, "status", "--json")

    assert result.returncode == 1
    printed = json.loads(result.stdout)
    assert printed["healthy"] is False and printed["paused"] == "test incident"
    assert "unhealthy" in result.stderr and "test incident" in result.stderr
    assert _comparable(printed) == _comparable(read_status(vault).as_dict())


def test_a_corrupt_record_replaced_by_a_reconnect_leaves_consistent_counts(
    sandbox: Sandbox, vault: Vault, redis_client: Any, connect: Any
) -> None:
    credential = connect(user_id="42")
    redis_client.set(credential_key(str(credential.id)), b'{"s":1,"v":1,"st":"act')  # truncated

    connect(user_id="42")  # the user reconnects: the record is whole again

    assert all(count >= 0 for count in read_status(vault).by_state.values())
    assert recount_states(vault) == {"active": 1}
    status = read_status(vault)
    assert status.by_state == {"active": 1}
    assert status.credentials == 1


def test_a_torn_journal_line_is_reported_not_fatal(sandbox: Sandbox, vault: Vault) -> None:
    [credential] = _import(sandbox, vault, 1)
    raw = vault.store.raw(credential.id)
    assert raw is not None
    line = JournalEntry(str(credential.id), "1", raw, None).to_line()
    journal = vault.rotator.journal
    journal.path.parent.mkdir(parents=True, exist_ok=True)
    journal.path.write_bytes(line[: len(line) // 2] + b"\n")  # a crash mid-append
    assert journal.replay(vault.store).remaining == 1  # kept: it might be a token pair

    status = read_status(vault)

    assert status.journal_pending == 1
    assert not status.healthy


def test_cli_status_exits_1_naming_what_falls_short_of_the_need(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    vault.import_many(sandbox.create_grants(200))  # 200 / 2654 s: about 0.075 refreshes/s

    result = run_cli({**env, "MIRO_TOKEN_RATE": "0.05"}, "status", "--json")

    assert result.returncode == 1
    figures = json.loads(result.stdout)["capacity"]
    assert figures["short_of"] == ["MIRO_TOKEN_RATE", "workers"]
    assert figures["needed"] == pytest.approx(0.0754, abs=0.001)
    assert "MIRO_TOKEN_RATE allows 0.05/s: raise it to at least 1" in result.stderr
    assert "no worker has been seen" in result.stderr


def test_cli_status_is_healthy_once_the_rate_and_the_workers_cover_the_need(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    vault.import_many(sandbox.create_grants(200))
    capacity.publish(vault.redis, report(token_rate=1.0, refresh_seconds=None, capacity=6.4))

    result = run_cli({**env, "MIRO_TOKEN_RATE": "0.05"}, "status")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "refreshes needed:       0.0754/s (steady 0.0754/s, due soon 0/s)" in lines
    assert "MIRO_TOKEN_RATE:        1/s" in lines  # the workers' limit, not this shell's
    assert "workers:                1 seen, can do 6.4/s, doing 12/s (1 not yet measured)" in lines
