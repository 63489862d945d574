"""Call Miro through Miro's Python SDK (``miro-api``) with the vault's tokens.

Install ``requirements-sdk.txt`` rather than ``requirements.txt`` to use this module: the SDK
is no dependency of the service, and it holds urllib3 below 2.

- :func:`miro_api_client` returns the SDK's ``MiroApi`` for one credential: every request
  reads the token through :meth:`Vault.access_token` (refreshed first, under the workers'
  lock, when due), goes to ``MIRO_API_URL`` within ``HTTP_TIMEOUT``, and is sent once more
  after a rotation's 401, as :func:`worker.client.miro_session` does.
- :class:`VaultStorage` is the ``Storage`` of the SDK's stateful ``Miro`` client, kept by the
  vault. It never hands the SDK a refresh token, so the SDK never refreshes behind the
  workers' back (it refreshes by itself, without a lock, only with one).
"""

from __future__ import annotations

import datetime
from typing import Any

try:
    from miro_api import MiroApi
    from miro_api.configuration import Configuration
    from miro_api.miro_api_wrapper import MiroApiClient
    from miro_api.rest import RESTClientObject, RESTResponse
    from miro_api.storage import State, Storage
except ImportError as missing:
    raise ImportError(
        "worker.sdk needs Miro's SDK (miro-api): install requirements-sdk.txt instead of "
        "requirements.txt (pip install -r requirements-sdk.txt)"
    ) from missing

from worker import miro
from worker.client import rotated_since
from worker.credential import Credential, CredentialId
from worker.secret import Secret
from worker.store import NotFoundError
from worker.vault import Vault, VaultError

#: How much earlier than Miro's ``expires_in`` the SDK dates a token's expiry.
SDK_EXPIRY_MARGIN = 120


class VaultApiClient(MiroApiClient):
    """The SDK's HTTP client for one credential: the vault's token, on ``MIRO_API_URL``."""

    def __init__(self, vault: Vault, credential_id: CredentialId) -> None:
        self.vault = vault
        self.credential_id = credential_id
        super().__init__(self._token)
        # The SDK's client goes to its process-wide default host (Miro's); this one goes
        # where the vault's settings say, the sandbox or any Miro-compatible server included.
        self.configuration = Configuration(host=vault.settings.miro_api_url)
        self.rest_client = RESTClientObject(self.configuration)

    def call_api(
        self,
        method: str,
        url: str,
        header_params: dict[str, str] | None = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> RESTResponse:
        """Send a request; once more with the new token if a rotation made Miro answer 401.

        A 401 with the stored token unchanged is Miro's real answer and is returned as is.
        """
        timeout = _request_timeout or self.vault.settings.http_timeout
        headers = header_params or {}
        # The SDK's client edits the headers it is given (a multipart request's): a copy each.
        response = super().call_api(method, url, dict(headers), body, post_params, timeout)
        sent = headers.get("Authorization")
        if response.status != 401 or not rotated_since(self.vault, self.credential_id, sent):
            return response
        response.read()  # read to its end, the connection goes back to the pool
        retry = {**headers, "Authorization": f"Bearer {self._token()}"}
        return super().call_api(method, url, retry, body, post_params, timeout)

    def _token(self) -> str:
        return self.vault.access_token(self.credential_id).reveal()


class VaultMiroApi(MiroApi):
    """Miro's ``MiroApi`` whose requests go through a :class:`VaultApiClient`."""

    def __init__(self, vault: Vault, credential_id: CredentialId) -> None:
        # MiroApi's own __init__ only builds the client this one replaces.
        self.api_client = VaultApiClient(vault, credential_id)


def miro_api_client(vault: Vault, credential_id: str | CredentialId) -> MiroApi:
    """Miro's SDK client calling Miro as the user of ``credential_id``.

    Its methods raise what :meth:`Vault.access_token` raises when the credential cannot give
    a token: ``NotFoundError`` (not stored) or ``VaultError`` (needs re-authorization, or a
    refresh that failed).

    Raises:
        InvalidCredentialId: the id is not ``<team_id>:<user_id>``.
    """
    return VaultMiroApi(vault, _credential_id(credential_id))


class VaultStorage(Storage):
    """The state of ``miro_api.Miro``'s one user, kept by the vault as a credential.

    The SDK's storage holds a single user's state, with no user id: make one storage (and
    one ``Miro``) per credential, ``VaultStorage(vault, "<team_id>:<user_id>")``. A storage
    made without an id takes the one of the user whose code ``Miro`` exchanges
    (``exchange_code_for_access_token``); read it from :attr:`credential_id` afterwards.

    :meth:`get` gives the SDK the current access token and no refresh token: the SDK
    refreshes by itself only with one, so it never refreshes behind the workers' back and
    every state it hands to :meth:`set` is a new grant from a code exchange.
    """

    def __init__(self, vault: Vault, credential_id: str | CredentialId | None = None) -> None:
        self.vault = vault
        self.credential_id = None if credential_id is None else _credential_id(credential_id)

    def get(self) -> State | None:
        """The credential's access token, refreshed first if due; None if none is stored.

        Raises:
            VaultError: the credential needs re-authorization, or its refresh failed.
        """
        if self.credential_id is None:
            return None
        try:
            token = self.vault.access_token(self.credential_id)
        except NotFoundError:
            return None
        return State(token.reveal(), refresh_token=None, token_expires_at=None)

    def set(self, state: State | None) -> None:
        """Store a grant the SDK obtained, or, given None (the SDK revoked), disconnect.

        Raises:
            VaultError: Miro's token info names no team or user for the new grant; it was
                not stored.
            MiroError: Miro could not be asked who the grant belongs to (the grant was not
                stored), or, disconnecting, to revoke (the credential is kept).
        """
        if state is None:
            self._disconnect()
        else:
            self.credential_id = self._store(state).id

    def _store(self, state: State) -> Credential:
        """Store a new grant under its user and team, which Miro's token info tells.

        The SDK keeps neither the ids nor the lifetime of the answer it got; its state has
        only the tokens and, at best, an expiry.
        """
        access = Secret(state.access_token)
        refresh = Secret(state.refresh_token) if state.refresh_token else None
        info = self.vault.client.token_info(access, hide=[refresh])
        response = {
            "access_token": state.access_token,
            "refresh_token": state.refresh_token,
            "expires_in": _expires_in(state),
            "team_id": _owner_id(info, "team"),
            "user_id": _owner_id(info, "user"),
            "scope": " ".join(info.get("scopes") or []),
            "token_type": "bearer",
        }
        return self.vault.import_response(response)

    def _disconnect(self) -> None:
        """Revoke (under the refresh lock) and delete the credential the SDK just revoked.

        The vault's revoke also catches a rotation that happened since the SDK read its
        token: the token the SDK revoked would then not be the grant's current one.
        """
        if self.credential_id is not None:
            self.vault.revoke(self.credential_id)
            self.credential_id = None


def _credential_id(credential_id: str | CredentialId) -> CredentialId:
    if isinstance(credential_id, str):
        return CredentialId.parse(credential_id)
    return credential_id


def _owner_id(info: dict[str, Any], owner: str) -> Any:
    """The id of the ``team`` or the ``user`` that Miro's token info names.

    Raises:
        VaultError: there is none.
    """
    named = info.get(owner)
    owner_id = named.get("id") if isinstance(named, dict) else None
    if owner_id is None or owner_id == "":
        raise VaultError(
            f"Miro's token info names no {owner} for the grant the SDK obtained, so it cannot "
            "be stored: connect the user again"
        )
    return owner_id


def _expires_in(state: State) -> int | None:
    """Seconds the access token lives: from the SDK's expiry, else Miro's documented lifetime.

    The SDK dates a token's expiry ``SDK_EXPIRY_MARGIN`` early, when it dates it at all
    (miro-api 2.2.4 never does). A grant without a refresh token does not expire.
    """
    if not state.refresh_token:
        return None
    if state.token_expires_at is None:
        return miro.DEFAULT_ACCESS_LIFETIME
    left = state.token_expires_at - datetime.datetime.now()
    return int(left.total_seconds()) + SDK_EXPIRY_MARGIN
