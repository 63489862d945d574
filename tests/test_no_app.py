"""Without the Miro app's id and secret, nothing is sent to Miro and no credential is blamed.

"Miro" here is a socket that listens and never answers: any call to it would show as a
connection waiting to be accepted. A command that needs Miro fails with one line naming the
variable to set, and leaves the credential's record as it was, byte for byte.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from settings import Settings, SettingsError
from tests.conftest import run_cli
from worker.credential import Credential
from worker.miro import MiroClient
from worker.outcomes import Outcome
from worker.sandbox import Sandbox
from worker.secret import Secret
from worker.vault import Vault


@pytest.fixture
def miro() -> Iterator[socket.socket]:
    """A "Miro" that takes connections into its backlog and never answers them."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        yield listener


def _was_called(miro: socket.socket) -> bool:
    try:
        connection, _ = miro.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


@pytest.fixture
def no_app_env(env: dict[str, str], miro: socket.socket) -> dict[str, str]:
    url = f"http://127.0.0.1:{miro.getsockname()[1]}"
    return {
        **env,
        "MIRO_CLIENT_ID": "",
        "MIRO_CLIENT_SECRET": "",
        "MIRO_REDIRECT_URI": "",
        "MIRO_API_URL": url,
        "MIRO_AUTH_URL": url,
        "HTTP_TIMEOUT": "2",
    }


@pytest.fixture
def due(sandbox: Sandbox, vault: Vault) -> tuple[Credential, bytes]:
    """A credential whose access token must be refreshed before use, and its stored bytes."""
    [response] = sandbox.create_grants(1)
    credential = vault.import_response({**response, "expires_in": 30})
    raw = vault.store.raw(credential.id)
    assert raw is not None
    return credential, raw


def _one_error_line(result: Any) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    return line


def test_token_of_a_due_credential_fails_and_prints_no_token(
    no_app_env: dict[str, str],
    miro: socket.socket,
    vault: Vault,
    due: tuple[Credential, bytes],
) -> None:
    credential, raw = due

    result = run_cli(no_app_env, "token", str(credential.id))

    assert _one_error_line(result).startswith("error: MIRO_CLIENT_ID is not set;")
    assert result.stdout == ""
    assert not _was_called(miro)
    assert vault.store.raw(credential.id) == raw  # no error stored, no failure counted
    assert vault.rotator.guard.paused() is None


@pytest.mark.parametrize(
    "command", [["rotate", "{id}", "--now"], ["revoke", "{id}"], ["connect-url"]]
)
def test_commands_that_need_miro_name_the_missing_setting(
    no_app_env: dict[str, str],
    miro: socket.socket,
    vault: Vault,
    due: tuple[Credential, bytes],
    command: list[str],
) -> None:
    credential, raw = due
    arguments = [part.format(id=credential.id) for part in command]

    line = _one_error_line(run_cli(no_app_env, *arguments))

    assert line.startswith("error: MIRO_CLIENT_ID is not set;")
    assert not _was_called(miro)
    assert vault.store.raw(credential.id) == raw


def test_doctor_reports_the_missing_app_without_calling_miro(
    no_app_env: dict[str, str], miro: socket.socket, vault: Vault
) -> None:
    result = run_cli(no_app_env, "doctor")
    assert result.returncode == 1
    assert "FAIL  settings  MIRO_CLIENT_ID is not set" in result.stdout
    assert not _was_called(miro)


def test_a_scheduled_rotation_without_an_app_fails_without_blaming_the_credential(
    no_app_env: dict[str, str],
    miro: socket.socket,
    vault: Vault,
    due: tuple[Credential, bytes],
) -> None:
    credential, raw = due
    unconfigured = Vault.from_settings(Settings.from_env(no_app_env))

    [result] = unconfigured.rotator.rotate_due([credential.id])

    assert result.outcome is Outcome.FAILED
    assert result.detail is not None and "MIRO_CLIENT_ID is not set" in result.detail
    assert not _was_called(miro)
    assert vault.store.raw(credential.id) == raw


@pytest.mark.parametrize("missing", ["MIRO_CLIENT_ID", "MIRO_CLIENT_SECRET"])
def test_the_miro_client_sends_nothing_without_the_apps_id_and_secret(
    no_app_env: dict[str, str], miro: socket.socket, missing: str
) -> None:
    app = {"MIRO_CLIENT_ID": "1", "MIRO_CLIENT_SECRET": "s", missing: ""}
    client = MiroClient(Settings.from_env({**no_app_env, **app}))
    token = Secret("a-token")
    calls = [
        lambda: client.refresh(token),
        lambda: client.exchange_code("a-code"),
        lambda: client.token_info(token),
        lambda: client.revoke(token),
    ]
    for call in calls:
        with pytest.raises(SettingsError, match=f"^{missing} is not set"):
            call()
    assert not _was_called(miro)
