"""Miro's own Python SDK, as an integrator installs it, calling the sandbox with the vault's tokens.

These tests need ``miro-api``, which only ``requirements-sdk.txt`` installs:
``tests/test_sdk_venv.py`` runs them in a virtualenv made from that lock. Elsewhere they are
skipped.

The SDK's stateful ``Miro`` sends its token calls to ``https://api.miro.com`` whatever any
setting says: :class:`_ToSandbox`, the SDK's own HTTP client with that address swapped for the
sandbox's, sends them to the sandbox instead.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

pytest.importorskip("miro_api", reason="Miro's SDK comes with requirements-sdk.txt only")

from miro_api import Miro
from miro_api.api_client import ApiClient
from miro_api.configuration import Configuration
from miro_api.exceptions import UnauthorizedException
from miro_api.storage import State

from tests.conftest import CLIENT_ID, REDIRECT_URI, ROOT, run_python
from worker.credential import Credential
from worker.credential import State as CredentialState
from worker.miro import DEFAULT_ACCESS_LIFETIME, MiroError
from worker.sandbox import Sandbox
from worker.sdk import VaultStorage, miro_api_client
from worker.store import NotFoundError
from worker.vault import Vault, VaultError

#: Where the SDK's ``Miro`` sends its token calls, and its users to authorize.
MIRO_API = "https://api.miro.com"
MIRO_AUTH = "https://miro.com"
BOARD = "uXjVO1"


class _ToSandbox(ApiClient):
    """The SDK's HTTP client, sending what ``Miro`` addresses to Miro to the sandbox.

    It notes the ``grant_type`` of each token call the SDK makes.
    """

    def __init__(self, sandbox_url: str) -> None:
        super().__init__()
        self.sandbox_url = sandbox_url
        self.grant_types: list[str] = []

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        self.grant_types += parse_qs(urlsplit(url).query).get("grant_type", [])
        return super().call_api(method, url.replace(MIRO_API, self.sandbox_url, 1), *args, **kwargs)


@pytest.fixture
def sdk_on_sandbox(sandbox: Sandbox) -> Iterator[None]:
    """The SDK's process-wide default host (``Miro.api`` calls it) set to the sandbox."""
    Configuration.set_default(Configuration(host=sandbox.url))
    yield
    Configuration.set_default(None)


def _miro(vault: Vault, sandbox: Sandbox, storage: VaultStorage) -> Miro:
    """The SDK's stateful client, as an integrator makes it, with the vault's storage."""
    miro = Miro(CLIENT_ID, vault.settings.miro_client_secret, REDIRECT_URI, storage=storage)
    miro._api_client = _ToSandbox(sandbox.url)
    return miro


def _connect(miro: Miro, sandbox: Sandbox) -> None:
    """Steps 1 and 2 of Miro's guide, the SDK's way: its authorize URL, then its exchange."""
    authorize = miro.get_auth_url(state="sdk").replace(MIRO_AUTH, sandbox.url, 1)
    approved = requests.get(authorize, allow_redirects=False, timeout=5)
    assert approved.status_code == 302, approved.text
    miro.exchange_code_for_access_token(approved.headers["Location"])


@pytest.fixture
def connected(sandbox: Sandbox, vault: Vault) -> Credential:
    """A user connected through the SDK's ``Miro`` into a :class:`VaultStorage`."""
    storage = VaultStorage(vault)
    _connect(_miro(vault, sandbox, storage), sandbox)
    assert storage.credential_id is not None
    return vault.store.load(storage.credential_id)


def test_a_user_connected_through_the_sdk_is_stored_by_the_vault(
    sandbox: Sandbox, vault: Vault
) -> None:
    storage = VaultStorage(vault)
    miro = _miro(vault, sandbox, storage)
    assert not miro.is_authorized
    before = int(time.time())

    _connect(miro, sandbox)  # every token parameter in the query string, as the SDK sends them

    assert miro._api_client.grant_types == ["authorization_code"]

    [grant] = sandbox.grants()
    assert str(storage.credential_id) == f"{grant['team_id']}:{grant['user_id']}"
    assert storage.credential_id is not None
    credential = vault.store.load(storage.credential_id)
    assert credential.access_token.reveal() == grant["access_token"]
    assert credential.refresh_token is not None
    assert credential.refresh_token.reveal() == grant["refresh_token"]
    assert credential.state is CredentialState.ACTIVE and credential.last_error is None
    assert credential.access_expires_at is not None
    assert before + DEFAULT_ACCESS_LIFETIME <= credential.access_expires_at
    assert credential.access_expires_at <= time.time() + DEFAULT_ACCESS_LIFETIME
    assert miro.is_authorized
    stats = sandbox.stats()
    assert stats["exchanges"] == 1 and stats["refreshes"] == 0


def test_the_storage_never_hands_the_sdk_a_refresh_token(
    vault: Vault, connected: Credential
) -> None:
    state = VaultStorage(vault, str(connected.id)).get()
    assert state == State(connected.access_token.reveal(), None, None)


def test_both_helpers_call_miro_with_the_vaults_token(
    sandbox: Sandbox, vault: Vault, connected: Credential, sdk_on_sandbox: None
) -> None:
    stateful = _miro(vault, sandbox, VaultStorage(vault, connected.id))

    boards = [
        miro_api_client(vault, str(connected.id)).get_specific_board(BOARD),
        stateful.api.get_specific_board(BOARD),
    ]

    assert [(board.id, board.owner.id) for board in boards] == [(BOARD, connected.id.user_id)] * 2
    assert sandbox.stats()["board_calls"] == 2


def test_the_api_client_calls_miro_api_url_not_the_sdks_default_host(
    sandbox: Sandbox, vault: Vault, connected: Credential
) -> None:
    api = miro_api_client(vault, connected.id)  # no default host set: the SDK's is Miro's

    assert api.get_specific_board(BOARD).id == BOARD
    assert sandbox.stats()["board_calls"] == 1


def test_the_sdk_uses_the_new_token_on_its_next_call_after_a_rotation(
    sandbox: Sandbox, vault: Vault, connected: Credential, sdk_on_sandbox: None
) -> None:
    api = miro_api_client(vault, connected.id)
    stateful = _miro(vault, sandbox, VaultStorage(vault, connected.id)).api
    for client in (api, stateful):
        client.get_specific_board(BOARD)

    vault.rotate_now(connected.id)

    for client in (api, stateful):
        assert client.get_specific_board(BOARD).id == BOARD
    stats = sandbox.stats()
    assert stats["refreshes"] == 1 and stats["board_calls"] == 4
    assert stats["stale_access_token_uses"] == 0


def test_a_401_from_a_rotation_in_flight_is_sent_again_with_the_new_token(
    sandbox: Sandbox, vault: Vault, connected: Credential
) -> None:
    client = miro_api_client(vault, connected.id).api_client
    # What every SDK method does, split where a rotation can strike: the request is made
    # with the current token, then Miro rotates the pair before the request arrives.
    request = client.param_serialize("GET", "/v2/boards/{board_id}", {"board_id": BOARD})
    vault.rotate_now(connected.id)

    response = client.call_api(*request)

    assert response.status == 200
    stats = sandbox.stats()
    assert stats["stale_access_token_uses"] == 1 and stats["board_calls"] == 2


def test_a_401_with_the_token_still_current_is_not_sent_again(
    sandbox: Sandbox, vault: Vault, connected: Credential
) -> None:
    sandbox.revoke_grant(connected.id.team_id, connected.id.user_id)  # the user uninstalls

    with pytest.raises(UnauthorizedException):
        miro_api_client(vault, connected.id).get_specific_board(BOARD)
    assert sandbox.stats()["board_calls"] == 1


def test_the_sdk_never_refreshes_an_expiring_token_the_vault_refreshes_it_under_the_lock(
    sandbox: Sandbox, vault: Vault, sdk_on_sandbox: None
) -> None:
    # Inside the least validity of a token handed out: the next use refreshes it first.
    expiring = vault.import_response({**sandbox.create_grants(1)[0], "expires_in": 30})
    miro = _miro(vault, sandbox, VaultStorage(vault, expiring.id))

    board = miro.api.get_specific_board(BOARD)

    assert board.owner.id == expiring.id.user_id
    assert miro._api_client.grant_types == []
    refreshed = vault.store.load(expiring.id)
    assert refreshed.version == expiring.version + 1  # the vault's one rotation...
    stats = sandbox.stats()
    assert stats["refreshes"] == 1 and stats["invalid_refresh_tokens"] == 0  # ...and no other
    assert stats["expired_access_token_uses"] == 0 and stats["stale_access_token_uses"] == 0


def test_a_storage_without_a_stored_credential_is_not_authorized(
    sandbox: Sandbox, vault: Vault
) -> None:
    for storage in (VaultStorage(vault), VaultStorage(vault, "3074457358607431473:1")):
        assert storage.get() is None
        assert not _miro(vault, sandbox, storage).is_authorized


def test_a_credential_that_needs_reauthorization_says_so_through_the_sdk(
    sandbox: Sandbox, vault: Vault, connected: Credential, sdk_on_sandbox: None
) -> None:
    sandbox.revoke_grant(connected.id.team_id, connected.id.user_id)
    vault.rotate_now(connected.id)  # Miro refuses the refresh token: needs_reauth
    miro = _miro(vault, sandbox, VaultStorage(vault, connected.id))

    assert not miro.is_authorized
    with pytest.raises(VaultError, match="needs_reauth"):
        miro.api.get_specific_board(BOARD)
    with pytest.raises(VaultError, match="needs_reauth"):
        miro_api_client(vault, connected.id).get_specific_board(BOARD)
    assert sandbox.stats()["board_calls"] == 0


def test_the_sdks_expiry_is_kept_when_it_dates_one(sandbox: Sandbox, vault: Vault) -> None:
    grant = sandbox.create_grants(1)[0]
    sdk_expiry = datetime.datetime.now() + datetime.timedelta(seconds=600 - 120)
    storage = VaultStorage(vault)

    storage.set(State(grant["access_token"], grant["refresh_token"], sdk_expiry))

    assert storage.credential_id is not None
    expires_at = vault.store.load(storage.credential_id).access_expires_at
    assert expires_at is not None and abs(expires_at - (time.time() + 600)) <= 2


def test_a_grant_miro_does_not_know_is_refused_and_not_stored(
    sandbox: Sandbox, vault: Vault
) -> None:
    unknown = State("a-token-miro-never-issued-0123456789", "a-refresh-token-0123456789", None)
    storage = VaultStorage(vault)

    with pytest.raises(MiroError) as refused:
        storage.set(unknown)

    for token in (unknown.access_token, unknown.refresh_token):
        assert token not in str(refused.value)
    assert storage.credential_id is None and list(vault.store.ids()) == []


def test_the_sdks_revoke_disconnects_the_credential(
    sandbox: Sandbox, vault: Vault, connected: Credential
) -> None:
    storage = VaultStorage(vault, connected.id)

    storage.set(None)  # what Miro.revoke_token does once Miro has revoked the token

    assert storage.credential_id is None
    with pytest.raises(NotFoundError):
        vault.store.load(connected.id)
    grant = sandbox.grant(connected.id.team_id, connected.id.user_id)
    assert grant is not None and grant["revoked"]
    assert sandbox.stats()["revokes"] == 1


def test_the_guides_example_lists_a_board(
    env: dict[str, str], sandbox: Sandbox, vault: Vault
) -> None:
    credential = vault.import_response(sandbox.create_grants(1)[0])
    guide = (ROOT / "docs" / "guide.md").read_text()
    section = guide.split("### From Python, with Miro's SDK", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert example, "the guide has no Python example under 'Call Miro with Miro's SDK'"
    code = example.group(1).replace("3074457358607431473:3458764513820540928", str(credential.id))

    result = run_python(env, "-c", code)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Sandbox board uXjVOfjkmAk="
    assert sandbox.stats()["board_calls"] == 1
