"""Call Miro from the integrator's own code with a stored credential.

:func:`miro_session` returns a ``requests.Session`` that puts the credential's current access
token on every request. The token is read through :meth:`Vault.access_token`, so a token about
to expire is refreshed first under the same single-flight lock the workers use: a web request
and a worker never refresh one credential twice.

A rotation (scheduled or forced) kills the old access token at Miro while calls made with it
may still be in flight; they come back 401. The session then waits for that rotation to
commit, re-reads the store and, if the token changed, sends the request once more. A 401 with
the token still current is Miro's real answer (the user revoked the app) and is returned as is.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from worker.constants import lock_key
from worker.credential import CredentialId
from worker.lock import POLL_INTERVAL
from worker.vault import Vault

#: Connections kept per host: a session is meant to be shared by an integrator's threads.
POOL_SIZE = 64
DEFAULT_PORTS = {"http": 80, "https": 443}


class MiroSession(requests.Session):
    """A session for one credential, talking to ``MIRO_API_URL`` only.

    Paths (``"/v2/boards/ID"``) are taken relative to ``MIRO_API_URL``. The bearer token is
    added in :meth:`send`, which every request, prepared request and redirect goes through,
    and only to a URL on ``MIRO_API_URL``'s scheme, host and port: anything else, a redirect
    elsewhere included, is refused with a ``ValueError`` before it leaves. Requests without
    a ``timeout`` get ``HTTP_TIMEOUT``. A request whose body is a stream cannot be sent
    twice; pass bytes, a dict or ``json=`` for the retry on 401 to work.

    Requests raise what :meth:`Vault.access_token` raises when the credential cannot give a
    token: ``NotFoundError`` (not stored) or ``VaultError`` (needs re-authorization, or a
    refresh that failed).
    """

    def __init__(self, vault: Vault, credential_id: CredentialId) -> None:
        super().__init__()
        self.vault = vault
        self.credential_id = credential_id
        self.api_url = vault.settings.miro_api_url
        adapter = HTTPAdapter(pool_maxsize=POOL_SIZE)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        """Send a request with the current token; once more after a rotation if Miro says 401."""
        method = method.decode() if isinstance(method, bytes) else method
        url = url.decode() if isinstance(url, bytes) else url
        url = self.api_url + url if url.startswith("/") else url
        kwargs.setdefault("timeout", self.vault.settings.http_timeout)
        response = super().request(method, url, *args, **kwargs)
        sent = response.request.headers.get("Authorization")
        if response.status_code != requests.codes.unauthorized or not rotated_since(
            self.vault, self.credential_id, sent
        ):
            return response
        response.close()
        return super().request(method, url, *args, **kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        """Send ``request`` with the current token, if it goes to ``MIRO_API_URL``.

        The token goes onto a copy: the caller's prepared request never holds it.

        Raises:
            ValueError: the URL is on another scheme, host or port; nothing was sent.
        """
        url = request.url or ""
        if _origin(url) != _origin(self.api_url):
            raise ValueError(
                f"this session sends {self.credential_id}'s token to MIRO_API_URL "
                f"({self.api_url}) only, not to {urlsplit(url).netloc or url[:40]!r}"
            )
        bearing = request.copy()
        token = self.vault.access_token(self.credential_id).reveal()
        bearing.headers["Authorization"] = f"Bearer {token}"
        return super().send(bearing, **kwargs)


def rotated_since(
    vault: Vault, credential_id: CredentialId, authorization: str | bytes | None
) -> bool:
    """Whether the store holds another token than a call's ``Authorization`` header carried.

    Every rotation holds the credential's refresh lock from its call to Miro until its
    commit, so once the lock is free the store is as new as Miro. Waiting for it (rather
    than taking it) lets all the threads that got a 401 go on together.
    """
    key = lock_key(str(credential_id))
    deadline = time.monotonic() + vault.settings.lock_ttl
    while vault.redis.exists(key) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
    current = vault.store.load(credential_id).access_token.reveal()
    return authorization != f"Bearer {current}"


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port, the port spelled out: a URL on ``:443`` is on ``https://host``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or DEFAULT_PORTS.get(scheme)


def miro_session(vault: Vault, credential_id: str | CredentialId) -> MiroSession:
    """A ``requests.Session`` that calls Miro as the user of ``credential_id``.

    Raises:
        InvalidCredentialId: the id is not ``<team_id>:<user_id>``.
    """
    if isinstance(credential_id, str):
        credential_id = CredentialId.parse(credential_id)
    return MiroSession(vault, credential_id)
