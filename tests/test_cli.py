"""``python -m worker`` as an operator runs it: real processes, real Redis, the real sandbox."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.fernet import Fernet

from tests.conftest import ROOT, authorize_code, free_port, run_cli
from worker.credential import Credential, CredentialId
from worker.crypto import KEY_FILE_NAME
from worker.sandbox import Sandbox
from worker.secret import Secret
from worker.vault import Vault


def _tokens(response: dict[str, Any]) -> list[str]:
    return [response["access_token"], response["refresh_token"]]


def _one_error_line(result: Any) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


#: A time in text output: ISO 8601 in UTC, then how far from now.
HUMAN_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \((in [^)]+|[^)]+ ago)\)"


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def imported(sandbox: Sandbox, vault: Vault) -> tuple[Credential, dict[str, Any]]:
    [response] = sandbox.create_grants(1)
    return vault.import_response(response), response


def test_gen_key_prints_a_fernet_key(env: dict[str, str]) -> None:
    result = run_cli(env, "gen-key")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert Fernet(key).decrypt(Fernet(key).encrypt(b"x")) == b"x"


def test_import_of_one_response_from_stdin_prints_it_without_tokens(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    [response] = sandbox.create_grants(1)

    result = run_cli(env, "import", "-", stdin=json.dumps(response))

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["id"] == f"{response['team_id']}:{response['user_id']}"
    assert printed["state"] == "active" and printed["version"] == 1
    for token in _tokens(response):
        assert token not in result.stdout
    stored = vault.store.load(CredentialId.parse(printed["id"]))
    assert stored.refresh_token == Secret(response["refresh_token"])


def test_import_with_jobs_prints_only_the_count(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    responses = sandbox.create_grants(3)

    result = run_cli(env, "import", "-", "--jobs", "2", stdin=json.dumps(responses))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"imported": 3}
    assert len(list(vault.store.ids())) == 3


def test_import_skipping_the_stored_prints_the_counts(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    responses = sandbox.create_grants(3)
    [first] = vault.import_many(responses[:1])

    result = run_cli(env, "import", "-", "--skip-stored", stdin=json.dumps(responses))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"imported": 2, "skipped": 1}
    assert vault.store.load(first.id) == first
    assert len(list(vault.store.ids())) == 3


def test_import_of_a_list_prints_a_list_without_tokens(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    responses = sandbox.create_grants(2)

    result = run_cli(env, "import", "-", stdin=json.dumps(responses))

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert [row["user_id"] for row in printed] == [r["user_id"] for r in responses]
    for response in responses:
        for token in _tokens(response):
            assert token not in result.stdout
    assert len(list(vault.store.ids())) == 2


def test_list_shows_credentials_without_tokens(
    env: dict[str, str], imported: tuple[Credential, dict[str, Any]]
) -> None:
    credential, response = imported

    table = run_cli(env, "list")
    as_json = run_cli(env, "list", "--json")

    assert table.returncode == 0 and as_json.returncode == 0, table.stderr + as_json.stderr
    assert str(credential.id) in table.stdout and "active" in table.stdout
    [row] = json.loads(as_json.stdout)
    assert row["id"] == str(credential.id) and row["version"] == 1
    for token in _tokens(response):
        assert token not in table.stdout and token not in as_json.stdout


def test_list_shows_expiries_as_utc_times_and_keeps_epoch_seconds_in_json(
    env: dict[str, str], imported: tuple[Credential, dict[str, Any]]
) -> None:
    table = run_cli(env, "list")
    [row] = json.loads(run_cli(env, "list", "--json").stdout)

    expires = row["access_expires_at"]
    assert isinstance(expires, int)
    assert f"{_utc(expires)} (in " in table.stdout
    assert str(expires) not in table.stdout


def test_status_shows_the_soonest_expiries_as_utc_times(
    env: dict[str, str], imported: tuple[Credential, dict[str, Any]]
) -> None:
    result = run_cli(env, "status")

    for expiry in ("access", "refresh"):
        line = rf"^soonest {expiry} expiry: +{HUMAN_TIME}$"
        assert re.search(line, result.stdout, re.MULTILINE), result.stdout


def test_token_prints_the_access_token(
    env: dict[str, str], imported: tuple[Credential, dict[str, Any]]
) -> None:
    credential, response = imported
    result = run_cli(env, "token", str(credential.id))
    assert result.returncode == 0, result.stderr
    assert result.stdout == response["access_token"] + "\n"


def test_rotate_now_rotates_at_miro_and_stores_the_new_pair(
    env: dict[str, str],
    sandbox: Sandbox,
    vault: Vault,
    imported: tuple[Credential, dict[str, Any]],
) -> None:
    credential, _ = imported

    result = run_cli(env, "rotate", str(credential.id), "--now", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outcome"] == "rotated"
    assert sandbox.stats()["refreshes"] == 1
    grant = sandbox.grant(credential.id.team_id, credential.id.user_id)
    assert grant is not None
    assert vault.store.load(credential.id).refresh_token == Secret(grant["refresh_token"])
    assert grant["refresh_token"] not in result.stdout


def test_rotate_prints_a_line_per_credential(
    env: dict[str, str], imported: tuple[Credential, dict[str, Any]]
) -> None:
    credential, _ = imported

    result = run_cli(env, "rotate", str(credential.id), "--now")

    assert result.returncode == 0, result.stderr
    header, line = result.stdout.splitlines()
    assert header.split() == ["ID", "OUTCOME", "VERSION", "NEXT", "REFRESH", "DETAIL"]
    assert re.match(rf"{credential.id} +rotated +2  {HUMAN_TIME}", line), line


def test_a_rate_limited_rotation_shows_its_next_try_as_a_utc_time(
    env: dict[str, str], sandbox: Sandbox, imported: tuple[Credential, dict[str, Any]]
) -> None:
    credential, _ = imported
    sandbox.set_faults(rate_limit_rate=1.0, rate_limit_reset_s=30)

    text = run_cli(env, "rotate", str(credential.id), "--now")
    as_json = run_cli(env, "rotate", str(credential.id), "--now", "--json")

    assert text.returncode == 1 and as_json.returncode == 1
    [line] = [line for line in text.stdout.splitlines() if line.startswith(str(credential.id))]
    assert re.search(rf" rate_limited +1  {HUMAN_TIME} +\S", line), line
    result = json.loads(as_json.stdout)
    assert result["outcome"] == "rate_limited"
    assert isinstance(result["retry_at"], float)


def test_a_generated_key_is_announced_once_on_stderr(env: dict[str, str]) -> None:
    without_keys = {**env, "TOKEN_ENCRYPTION_KEYS": ""}

    first = run_cli(without_keys, "list")
    later = run_cli(without_keys, "list")

    assert first.returncode == 0 and later.returncode == 0, first.stderr + later.stderr
    assert "GENERATED a new encryption key" in first.stderr
    assert str(Path(env["DATA_DIR"]) / KEY_FILE_NAME) in first.stderr
    assert later.stderr == ""


def test_exchange_stores_the_credential_of_a_code(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    code = authorize_code(sandbox, vault, team_id="3074457358607431473")

    result = run_cli(env, "exchange", code)

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["team_id"] == "3074457358607431473"
    stored = vault.store.load(CredentialId.parse(printed["id"]))
    grant = sandbox.grant(stored.id.team_id, stored.id.user_id)
    assert grant is not None and stored.access_token == Secret(grant["access_token"])
    assert grant["access_token"] not in result.stdout and code not in result.stdout


def test_an_unknown_id_fails_with_one_line(env: dict[str, str], vault: Vault) -> None:
    line = _one_error_line(run_cli(env, "token", "1:2"))
    assert "no credential 1:2" in line


@pytest.mark.parametrize(
    ("credential_id", "words"), [("12345", "<team_id>:<user_id>"), ("1:*", "letters, digits")]
)
def test_a_malformed_id_fails_with_one_line(
    env: dict[str, str], vault: Vault, credential_id: str, words: str
) -> None:
    assert words in _one_error_line(run_cli(env, "token", credential_id))


def test_a_missing_client_id_is_named(env: dict[str, str], vault: Vault) -> None:
    line = _one_error_line(run_cli({**env, "MIRO_CLIENT_ID": ""}, "exchange", "some-code"))
    assert "MIRO_CLIENT_ID is not set" in line


def test_a_bad_setting_is_named(env: dict[str, str]) -> None:
    line = _one_error_line(run_cli({**env, "HTTP_TIMEOUT": "soon"}, "list"))
    assert "HTTP_TIMEOUT" in line


def test_a_file_that_is_not_json_fails_with_one_line(
    env: dict[str, str], vault: Vault, tmp_path: Path
) -> None:
    path = tmp_path / "responses.json"
    path.write_text('{"access_token": "a",')
    line = _one_error_line(run_cli(env, "import", str(path)))
    assert str(path) in line and "not JSON" in line
    assert list(vault.store.ids()) == []


def test_a_wrong_command_line_exits_2(env: dict[str, str]) -> None:
    result = run_cli(env, "token")
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_an_import_names_the_bad_response_and_its_user_and_stores_nothing(
    env: dict[str, str], sandbox: Sandbox, vault: Vault, tmp_path: Path
) -> None:
    responses = sandbox.create_grants(3)
    bad = {**responses[1], "access_token": ""}
    path = tmp_path / "users.json"
    path.write_text(json.dumps([responses[0], bad, responses[2]]))

    result = run_cli(env, "import", str(path))

    line = _one_error_line(result)
    assert line.startswith(
        f"error: response 1 (team {bad['team_id']}, user {bad['user_id']}): the token response "
        "has no access_token string"
    )
    assert line.endswith("; nothing was stored") and "HTTP" not in line
    for response in responses:
        for token in _tokens(response):
            assert token not in result.stderr
    assert list(vault.store.ids()) == []


def test_an_import_names_a_response_that_is_no_object(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    responses = [*sandbox.create_grants(2), "an access token, perhaps"]
    line = _one_error_line(run_cli(env, "import", "-", stdin=json.dumps(responses)))
    assert line == (
        "error: response 2: the token response is a JSON string, not an object; nothing was stored"
    )
    assert list(vault.store.ids()) == []


def test_a_file_nested_too_deeply_fails_with_one_line(
    env: dict[str, str], vault: Vault, tmp_path: Path
) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    line = _one_error_line(run_cli(env, "import", str(path)))
    assert line.startswith(f"error: {path}: nested too deeply")
    assert list(vault.store.ids()) == []


@pytest.mark.parametrize(
    "template",
    [
        "redis//:{password}@localhost:6379/0",  # the colon of the scheme forgotten
        "redis://localhost:{password}/0",  # the password where the port goes
        "redis://:{password}@localhost:6379/0?socket_timeout=soon",
        "redis://:{password}@[::1/0",
        "https://:{password}@localhost:6379/0",
    ],
)
def test_a_malformed_redis_url_is_named_without_its_password(
    env: dict[str, str], template: str
) -> None:
    password = secrets.token_urlsafe(16)
    result = run_cli({**env, "REDIS_URL": template.format(password=password)}, "list")
    line = _one_error_line(result)
    assert line.startswith("error: REDIS_URL ")
    assert password not in result.stderr + result.stdout


def test_the_sandbox_command_runs_as_the_readme_writes_it() -> None:
    port = free_port()
    command = [
        *("-m", "worker", "sandbox", "--port", str(port)),
        *("--client-id", "my-app", "--client-secret", "s3cret", "--access-ttl", "120"),
    ]
    with subprocess.Popen(
        [sys.executable, *command],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as sandbox:
        try:
            assert sandbox.stdout is not None
            assert sandbox.stdout.readline().strip() == f"http://127.0.0.1:{port}"
            seeded = requests.post(
                f"http://127.0.0.1:{port}/_sandbox/grants", json={"count": 1}, timeout=5
            )
            assert seeded.json()["responses"][0]["expires_in"] == 120
            sandbox.send_signal(signal.SIGTERM)
            assert sandbox.wait(timeout=10) == 0
        finally:
            if sandbox.poll() is None:
                sandbox.kill()


def test_the_sandbox_command_shows_the_sandboxs_options() -> None:
    result = run_cli({}, "sandbox", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m worker sandbox")
    assert "--client-secret" in result.stdout and "--access-ttl" in result.stdout


def test_other_commands_still_refuse_unknown_options(env: dict[str, str]) -> None:
    result = run_cli(env, "list", "--port", "1")
    assert result.returncode == 2
    assert "unrecognized arguments: --port 1" in result.stderr
