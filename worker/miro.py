"""Miro's OAuth 2.0 endpoints, and how their failures are classified.

Every failure becomes one of five kinds, because each calls for a different reaction:

========================  ===================================================================
:class:`Transient`         network error, timeout, 5xx, unreadable answer: try again later
:class:`RateLimited`       429: try again after ``retry_at``
:class:`Rejected`          the refresh token or code was refused: the user must reconnect
:class:`ClientRefused`     the app's own id/secret/redirect URI was refused: an incident
:class:`TokenUnknown`      revoke of a token Miro no longer knows (already gone)
========================  ===================================================================

Miro does not document the exact status of each refusal, so the body's wording decides
first and the status second; the body is kept for the operator with any secret we sent
scrubbed out, and never a token.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import requests

from settings import Settings
from worker.secret import Secret

MAX_BODY_BYTES = 64 * 1024
BODY_EXCERPT_CHARS = 300
DEFAULT_RATE_LIMIT_WAIT = 60.0
MAX_RATE_LIMIT_WAIT = 3600.0
#: An X-RateLimit-Reset above this is in milliseconds (seconds would be the year 5138).
MILLISECOND_EPOCH = 1e11
#: Used when a successful answer carries no usable ``expires_in`` (Miro documents 3599).
DEFAULT_ACCESS_LIFETIME = 3599
MAX_ACCESS_LIFETIME = 366 * 86400

#: Words that name the app's own credentials as the culprit, the sure ones first.
_CLIENT_CODES = ("invalid_client", "unauthorized_client")
_CLIENT_WORDS = ("client", "redirect uri")
#: Words that name the user's grant (refresh token or code) as the culprit.
_GRANT_WORDS = (
    "invalid_grant",
    "invalidgrant",
    "refresh token",
    "authorization code",
    "invalid token",
)


class MiroError(Exception):
    """A call to Miro failed. ``status`` and ``body`` are kept for the operator."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    def __str__(self) -> str:
        detail = f"HTTP {self.status}: " if self.status else ""
        excerpt = f" ({self.body})" if self.body else ""
        return f"{detail}{self.args[0]}{excerpt}"


class Transient(MiroError):
    """Worth retrying: nothing says the credential is bad."""


class RateLimited(MiroError):
    """Miro asks us to slow down until ``retry_at`` (epoch seconds)."""

    def __init__(self, message: str, retry_at: float, status: int = 429, body: str = "") -> None:
        super().__init__(message, status, body)
        self.retry_at = retry_at


class Rejected(MiroError):
    """Miro refused this refresh token or code: this grant is dead."""


class ClientRefused(MiroError):
    """Miro refused the app itself; no user's credential is at fault."""


class TokenUnknown(MiroError):
    """Miro does not know this token (for revoke: it is gone already)."""


@dataclass(frozen=True)
class TokenGrant:
    """A successful answer of the token endpoint, checked and typed."""

    access_token: Secret
    refresh_token: Secret | None
    expires_in: int | None
    team_id: str | None
    user_id: str | None
    scope: str
    token_type: str
    #: Something in the answer was off but the tokens were kept (they may be the only copy).
    warning: str | None = None


def _settle_environment(session: requests.Session, url: str) -> None:
    """Read the proxy and CA-bundle variables once, for the one host this session calls.

    With ``trust_env`` on, requests reads them again, and looks for ``~/.netrc``, on every
    call: 1.3 ms of CPU per refresh here, as much as the rest of the refresh's own Python.
    """
    environment = session.merge_environment_settings(url, {}, None, None, None)
    session.proxies.update(environment["proxies"])
    session.verify = environment["verify"]
    session.trust_env = False


class MiroClient:
    """One ``requests`` session to Miro, with a timeout on every call."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.api_url = settings.miro_api_url
        self.auth_url = settings.miro_auth_url
        self.client_id = settings.miro_client_id or ""
        self._client_secret = Secret(settings.miro_client_secret or "")
        self.redirect_uri = settings.miro_redirect_uri or ""
        self.timeout = settings.http_timeout
        self.session = session or requests.Session()
        # Thread pools share this session: keep one connection per worker thread.
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=256)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        _settle_environment(self.session, self.api_url)

    def authorize_url(self, state: str, team_id: str | None = None) -> str:
        """Step 1 of Miro's guide: the link that asks a user to install the app."""
        query = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "state": state,
        }
        if team_id:
            query["team_id"] = team_id
        return f"{self.auth_url}/oauth/authorize?{urlencode(query)}"

    def exchange_code(self, code: str) -> TokenGrant:
        """Step 2: trade an authorization code for a token pair."""
        return self._token_call(
            {"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri},
            secrets=(code,),
        )

    def refresh(self, refresh_token: Secret) -> TokenGrant:
        """Step 4: trade a refresh token for a new pair. The old pair dies on success."""
        token = refresh_token.reveal()
        return self._token_call(
            {"grant_type": "refresh_token", "refresh_token": token}, secrets=(token,)
        )

    def token_info(self, access_token: Secret) -> dict[str, Any]:
        """``GET /v1/oauth-token``: who the token belongs to and its scopes."""
        token = access_token.reveal()
        response = self._send(
            "GET",
            "/v1/oauth-token",
            headers={"Authorization": f"Bearer {token}"},
            secrets=(token,),
        )
        body = _read_json(response, (token,))
        if not isinstance(body, dict):
            raise Transient("token info is not a JSON object", response.status_code)
        return body

    def revoke(self, access_token: Secret) -> None:
        """``POST /v2/oauth/revoke``: ends the grant (its refresh token too).

        Raises:
            TokenUnknown: Miro answered 404, the token is gone already.
        """
        token = access_token.reveal()
        self._send(
            "POST",
            "/v2/oauth/revoke",
            json={
                "accessToken": token,
                "clientId": self.client_id,
                "clientSecret": self._client_secret.reveal(),
            },
            secrets=(token,),
            not_found=TokenUnknown,
        )

    def _token_call(self, params: dict[str, str], secrets: tuple[str, ...]) -> TokenGrant:
        form = {
            "client_id": self.client_id,
            "client_secret": self._client_secret.reveal(),
            **params,
        }
        response = self._send("POST", "/v1/oauth/token", data=form, secrets=secrets)
        return parse_token_response(_read_json(response, secrets), response.status_code)

    def _send(
        self,
        method: str,
        path: str,
        *,
        secrets: tuple[str, ...],
        not_found: type[MiroError] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        try:
            response = self.session.request(
                method, self.api_url + path, timeout=self.timeout, stream=True, **kwargs
            )
        except requests.Timeout:
            raise Transient(f"Miro did not answer {path} within {self.timeout:g} s") from None
        except requests.RequestException as error:
            raise Transient(f"cannot reach Miro at {path}: {type(error).__name__}") from None
        if response.status_code < 400:
            return response
        scrub = (*secrets, self._client_secret.reveal())
        body = _excerpt(response, scrub)
        if response.status_code == 404 and not_found:
            raise not_found("Miro does not know this token", 404, body)
        raise classify(response.status_code, body, response.headers)


def classify(status: int, body: str, headers: Any, now: float | None = None) -> MiroError:
    """Turn a failed answer into the error kind that decides what happens next."""
    now = time.time() if now is None else now
    if status == 429:
        return RateLimited("rate limited by Miro", _retry_at(headers, now), status, body)
    if status >= 500:
        return Transient("Miro failed", status, body)
    words = body.lower()
    if any(word in words for word in _CLIENT_CODES):
        return ClientRefused(_CLIENT_HINT, status, body)
    if any(word in words for word in _GRANT_WORDS):
        return Rejected("Miro refused the grant", status, body)
    if status == 401 or any(word in words for word in _CLIENT_WORDS):
        return ClientRefused(_CLIENT_HINT, status, body)
    return Rejected("Miro refused the grant", status, body)


_CLIENT_HINT = (
    "Miro refused the app's credentials; check MIRO_CLIENT_ID, MIRO_CLIENT_SECRET and "
    "MIRO_REDIRECT_URI against the app's settings"
)


def _retry_at(headers: Any, now: float) -> float:
    """When Miro lets us call again: its reset time, within [now, now + an hour]."""
    return min(max(_stated_retry_at(headers, now), now), now + MAX_RATE_LIMIT_WAIT)


def _stated_retry_at(headers: Any, now: float) -> float:
    reset = _finite(headers.get("X-RateLimit-Reset"))
    if reset is not None:
        return reset / 1000 if reset > MILLISECOND_EPOCH else reset
    retry_after = headers.get("Retry-After")
    seconds = _finite(retry_after)
    if seconds is not None:
        return now + seconds
    if retry_after:
        try:
            return parsedate_to_datetime(retry_after).timestamp()
        except (TypeError, ValueError):
            pass
    return now + DEFAULT_RATE_LIMIT_WAIT


def _finite(value: str | None) -> float | None:
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _read_body(response: requests.Response) -> bytes:
    """The body, refusing to hold more than ``MAX_BODY_BYTES`` of it in memory."""
    chunks, size = [], 0
    try:
        for chunk in response.iter_content(8192):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise Transient(
                    f"Miro's answer exceeds {MAX_BODY_BYTES} bytes", response.status_code
                )
            chunks.append(chunk)
    except requests.RequestException as error:
        raise Transient(f"Miro's answer broke off: {type(error).__name__}") from None
    finally:
        response.close()
    return b"".join(chunks)


def _excerpt(response: requests.Response, secrets: tuple[str, ...]) -> str:
    try:
        text = _read_body(response).decode("utf-8", "replace")
    except Transient:
        text = "<body too large>"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text[:BODY_EXCERPT_CHARS]


def _read_json(response: requests.Response, secrets: tuple[str, ...]) -> Any:
    body = _read_body(response)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON, too deep, a number of 5000 digits
        # A 2xx that is not JSON may still have rotated the grant: never echo it back.
        raise Transient(
            f"Miro answered HTTP {response.status_code} with a body that is not JSON "
            f"({len(body)} bytes, content type {response.headers.get('Content-Type')!r})",
            response.status_code,
        ) from None


def parse_token_response(body: Any, status: int = 200) -> TokenGrant:
    """Check a token answer field by field.

    A grant whose ``access_token`` is usable is always kept, even when other fields are off:
    after a refresh it may be the only copy of the new pair. Problems with the other fields
    become a ``warning`` and safe defaults.

    Raises:
        Transient: no usable access token (Miro may or may not have rotated; the next try
            with the old refresh token tells).
    """
    if not isinstance(body, dict):
        raise Transient(f"token answer is a JSON {type(body).__name__}, not an object", status)
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise Transient(
            f"token answer has no access_token string (fields: {sorted(map(str, body))[:12]})",
            status,
        )
    warnings: list[str] = []
    refresh = _optional_string(body, "refresh_token", warnings)
    return TokenGrant(
        access_token=Secret(access),
        refresh_token=Secret(refresh) if refresh else None,
        expires_in=_expires_in(body, warnings, has_refresh=bool(refresh)),
        team_id=_id_field(body, "team_id", warnings),
        user_id=_id_field(body, "user_id", warnings),
        scope=_optional_string(body, "scope", warnings) or "",
        token_type=_optional_string(body, "token_type", warnings) or "bearer",
        warning="; ".join(warnings) or None,
    )


def _optional_string(body: dict[str, Any], name: str, warnings: list[str]) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    warnings.append(f"{name} is a {type(value).__name__}, ignored")
    return None


def _id_field(body: dict[str, Any], name: str, warnings: list[str]) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    # A bare JSON number arrives as an exact Python int; a float would have lost digits.
    if isinstance(value, bool) or not isinstance(value, int | str):
        warnings.append(f"{name} is a {type(value).__name__}, ignored")
        return None
    return str(value)


def _expires_in(body: dict[str, Any], warnings: list[str], *, has_refresh: bool) -> int | None:
    value = body.get("expires_in")
    if value is None and not has_refresh:
        return None  # a non-expiring token
    valid_int = isinstance(value, int) and not isinstance(value, bool)
    if not valid_int or not 0 < value <= MAX_ACCESS_LIFETIME:
        warnings.append(
            f"expires_in {str(value)[:20]!r} is not a positive number of seconds up to "
            f"{MAX_ACCESS_LIFETIME}; assumed {DEFAULT_ACCESS_LIFETIME}"
        )
        return DEFAULT_ACCESS_LIFETIME
    return value
