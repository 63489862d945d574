"""``python -m worker doctor``: each check against real servers, then the command itself."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet
from redis.backoff import NoBackoff
from redis.retry import Retry

from settings import Settings
from tests.conftest import EVERY_DIALECT, free_port, run_cli, wait_for
from tests.test_capacity import report
from worker import capacity, doctor
from worker.constants import credential_key
from worker.crypto import KEY_FILE_NAME
from worker.doctor import Level
from worker.outcomes import Outcome
from worker.redis_server import server_binary
from worker.sandbox import Sandbox
from worker.vault import Vault


def _with(env: dict[str, str], **changes: str) -> Settings:
    return Settings.from_env({**env, **changes})


def _store_one(sandbox: Sandbox, settings: Settings) -> None:
    """A credential written by a process whose first key is ``settings``' first key."""
    Vault.from_settings(settings).import_response(sandbox.create_grants(1)[0])


def test_a_healthy_installation_passes(env: dict[str, str], sandbox: Sandbox, vault: Vault) -> None:
    vault.import_response(sandbox.create_grants(1)[0])
    capacity.publish(vault.redis, report())  # a worker running

    result = run_cli(env, "doctor")

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for check in ("settings", "redis", "keys", "capacity", "miro"):
        assert any(line.startswith(f"OK    {check}") for line in lines), result.stdout
    assert "1 records sampled: 1 decrypt with the first key" in result.stdout
    assert "FAIL" not in result.stdout


def test_keys_are_counted_by_which_one_decrypts(
    env: dict[str, str], sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    old, new, lost = (Fernet.generate_key().decode() for _ in range(3))
    _store_one(sandbox, _with(env, TOKEN_ENCRYPTION_KEYS=old))
    _store_one(sandbox, _with(env, TOKEN_ENCRYPTION_KEYS=f"{new},{old}"))
    settings = _with(env, TOKEN_ENCRYPTION_KEYS=f"{new},{old}")

    rolling = doctor.check_keys(settings, redis_client)

    _store_one(sandbox, _with(env, TOKEN_ENCRYPTION_KEYS=lost))
    redis_client.set(credential_key("1:2"), b"not a record")
    broken = doctor.check_keys(settings, redis_client)

    assert rolling.level is Level.WARN and "rotate-key" in rolling.fix
    assert "2 records sampled: 1 decrypt with the first key, 1 with another key" in rolling.detail
    assert broken.level is Level.FAIL and "TOKEN_ENCRYPTION_KEYS" in broken.fix
    assert "1 with another key, 1 with none, 1 corrupt" in broken.detail


def test_the_key_check_generates_no_key(
    env: dict[str, str], sandbox: Sandbox, vault: Vault, tmp_path: Path
) -> None:
    vault.import_response(sandbox.create_grants(1)[0])
    settings = _with(env, TOKEN_ENCRYPTION_KEYS="", DATA_DIR=str(tmp_path / "fresh"))

    finding = doctor.check_keys(settings, vault.redis)

    assert finding.level is Level.FAIL and "1 with none" in finding.detail
    assert not (tmp_path / "fresh" / KEY_FILE_NAME).exists()


@EVERY_DIALECT
def test_a_wrong_client_secret_is_never_passed_nor_failed_by_wording(
    env: dict[str, str], sandbox: Sandbox
) -> None:
    finding = doctor.check_miro(_with(env, MIRO_CLIENT_SECRET="not-the-secret"))

    assert finding.level is Level.WARN and finding.detail.startswith("cannot tell")
    assert "MIRO_CLIENT_SECRET" in finding.fix and "rotate" in finding.fix
    assert sandbox.stats()["exchanges"] == 0


@pytest.mark.parametrize(
    ("dialect", "level"), [("miro", Level.OK), ("rfc6749", Level.OK), ("uniform", Level.WARN)]
)
def test_the_right_secret_passes_where_miro_tells_it_from_a_wrong_one(
    settings: Settings, sandbox: Sandbox, dialect: str, level: Level
) -> None:
    finding = doctor.check_miro(settings)

    assert finding.level is level
    if level is Level.OK:
        assert "tells this client secret from a wrong one" in finding.detail
    assert sandbox.stats()["token_calls"] == 2  # one probe: the secret, then a made-up one


@EVERY_DIALECT
def test_a_success_with_these_credentials_passes_without_a_probe(
    env: dict[str, str], sandbox: Sandbox, vault: Vault, redis_client: redis.Redis
) -> None:
    credential = vault.import_response(sandbox.create_grants(1)[0])
    assert vault.rotate_now(credential.id).outcome is Outcome.ROTATED
    calls = sandbox.stats()["token_calls"]

    right = doctor.check_miro(_with(env), redis_client)
    wrong = doctor.check_miro(_with(env, MIRO_CLIENT_SECRET="not-the-secret"), redis_client)

    assert right.level is Level.OK and re.search(
        r"succeeded at \d{4}-\d\d-\d\dT[\d:]{8}Z \((a moment|\d+ seconds) ago\)", right.detail
    )
    assert wrong.level is Level.WARN  # the success was another secret's
    assert sandbox.stats()["token_calls"] == calls + 2  # the wrong one's probe only
    vault.rotator.guard.pause("an incident since")
    assert doctor.check_miro(_with(env), redis_client).detail != right.detail


def test_an_unreachable_miro_is_named(env: dict[str, str]) -> None:
    finding = doctor.check_miro(_with(env, MIRO_API_URL=f"http://127.0.0.1:{free_port()}"))
    assert finding.level is Level.FAIL and "MIRO_API_URL" in finding.fix


@pytest.fixture
def redis_without_aof(tmp_path: Path) -> Iterator[redis.Redis]:
    port = free_port()
    arguments = ["--port", str(port), "--bind", "127.0.0.1", "--appendonly", "no", "--save", ""]
    process = subprocess.Popen([server_binary(), *arguments, "--dir", str(tmp_path)])
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(client), 10, "redis-server to start")
        yield client
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_redis_without_append_only_persistence_fails(redis_without_aof: redis.Redis) -> None:
    finding = doctor.check_redis(redis_without_aof)
    assert finding.level is Level.FAIL and "appendonly yes" in finding.fix


def test_redis_with_append_only_persistence_passes(redis_client: redis.Redis) -> None:
    assert doctor.check_redis(redis_client).level is Level.OK


def test_an_unreachable_redis_is_named() -> None:
    nowhere = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    finding = doctor.check_redis(nowhere)
    assert finding.level is Level.FAIL and "REDIS_URL" in finding.fix


def test_settings_problems_are_reported_not_raised(env: dict[str, str]) -> None:
    unparsable, _ = doctor.check_settings({**env, "LOCK_TTL": "soon"})
    assert unparsable is None

    settings, findings = doctor.check_settings(
        {**env, "MIRO_CLIENT_ID": "", "TOKEN_ENCRYPTION_KEYS": ""}
    )
    assert settings is not None
    levels = {finding.level for finding in findings}
    assert levels == {Level.FAIL, Level.WARN}
    assert any("MIRO_CLIENT_ID" in finding.detail for finding in findings)


def test_the_command_exits_1_and_says_what_to_fix(env: dict[str, str], vault: Vault) -> None:
    result = run_cli({**env, "MIRO_API_URL": f"http://127.0.0.1:{free_port()}"}, "doctor")

    assert result.returncode == 1
    assert "FAIL  miro" in result.stdout and "fix: " in result.stdout
    assert "1 problem(s) to fix" in result.stderr


def test_a_secret_it_cannot_judge_is_a_warning_that_says_what_to_do(
    env: dict[str, str], vault: Vault
) -> None:
    result = run_cli({**env, "MIRO_CLIENT_SECRET": "not-the-secret"}, "doctor")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN  miro      cannot tell" in result.stdout and "fix: run" in result.stdout
    assert "not-the-secret" not in result.stdout + result.stderr


def test_a_rate_limit_below_the_need_fails_with_the_rate_to_set(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    vault.import_many(sandbox.create_grants(200))  # about 0.075 refreshes/s
    capacity.publish(vault.redis, report(token_rate=0.05))

    finding = doctor.check_capacity(_with(env), vault.redis)

    assert finding.level is Level.FAIL
    assert "need 0.0754/s refreshes; MIRO_TOKEN_RATE allows 0.05/s" in finding.detail
    assert "raise it to at least 1" in finding.fix


def test_workers_short_of_the_need_fail_with_how_many_to_add(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    vault.import_many(sandbox.create_grants(200))
    capacity.publish(vault.redis, report(capacity=0.03))

    finding = doctor.check_capacity(_with(env), vault.redis)

    assert finding.level is Level.FAIL
    assert "start 2 more like them" in finding.fix and "WORKER_CONCURRENCY" in finding.fix


def test_no_worker_seen_is_a_warning_and_enough_of_them_is_ok(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    vault.import_many(sandbox.create_grants(200))

    alone = doctor.check_capacity(_with(env), vault.redis)
    capacity.publish(vault.redis, report())
    served = doctor.check_capacity(_with(env), vault.redis)

    assert alone.level is Level.WARN and "celery -A worker worker" in alone.fix
    assert served.level is Level.OK and "1 workers seen can do 320/s" in served.detail
