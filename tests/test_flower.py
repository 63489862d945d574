"""Flower: a login, ids and outcomes only, and the history kept across a restart."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import requests

from soak.processes import ServiceProcesses
from tests.conftest import run_cli, wait_for
from worker.sandbox import Sandbox
from worker.vault import Vault

pytestmark = pytest.mark.slow


def _tasks(port: int, auth: tuple[str, str]) -> dict[str, Any] | None:
    try:
        response = requests.get(f"http://127.0.0.1:{port}/api/tasks", auth=auth, timeout=5)
    except requests.ConnectionError:
        return None
    return response.json() if response.status_code == 200 else None


def test_flower_shows_ids_and_outcomes_and_keeps_them_across_a_restart(
    sandbox: Sandbox, vault: Vault, env: dict[str, str], tmp_path: Any
) -> None:
    auth = ("admin", secrets.token_urlsafe(12))
    env = {**env, "FLOWER_BASIC_AUTH": ":".join(auth)}
    service = ServiceProcesses(env, tmp_path / "logs")
    credential = vault.import_response({**sandbox.create_grants(1)[0], "expires_in": 3599})
    try:
        service.worker()
        flower, port = service.flower()
        service.wait_ready()
        wait_for(lambda: _tasks(port, auth) is not None, timeout=30, message="Flower's API")
        assert run_cli(env, "rotate", str(credential.id), "--wait").returncode == 0

        def rotated_task() -> dict[str, Any] | None:
            tasks = _tasks(port, auth) or {}
            return next(
                (t for t in tasks.values() if t.get("name") == "tasks.refresh.rotate"
                 and t.get("state") == "SUCCESS"),
                None,
            )  # fmt: skip

        task = wait_for(rotated_task, timeout=30, message="the rotation in Flower")
        assert str(credential.id) in task["args"]
        assert "'outcome': 'rotated'" in task["result"]
        assert requests.get(f"http://127.0.0.1:{port}/api/tasks", timeout=5).status_code == 401

        service.stop(flower)  # Flower saves its state on a clean stop
        _, port = service.flower()
        wait_for(lambda: _tasks(port, auth) is not None, timeout=30, message="Flower again")
        history = _tasks(port, auth) or {}
        assert task["uuid"] in history
    finally:
        service.stop_all()
    grant = sandbox.grant(credential.id.team_id, credential.id.user_id)
    assert grant is not None
    for secret in (grant["access_token"], grant["refresh_token"]):
        assert secret not in str(task)
