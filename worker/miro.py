"""Miro's OAuth 2.0 endpoints, and how their failures are classified.

Every failure becomes one of three kinds, because each calls for a different reaction:

========================  ===================================================================
:class:`Transient`         network error, timeout, 408, 5xx, unreadable answer: try again later
:class:`RateLimited`       429: try again after ``retry_at``
:class:`Refused`           any other 4xx: Miro refused the call
========================  ===================================================================

The status alone decides. Miro does not document how it refuses a spent refresh token, a bad
code or a wrong client secret, and may word them all alike, so a refusal says nothing of who
is at fault: the user's grant or the app's own credentials. That is told by evidence (see
:mod:`worker.evidence` and :mod:`worker.incident`), never by the wording. Of a failed answer
only Miro's code and message are kept, for the operator (see :func:`what_miro_said`), never the
rest of its body: an error page may quote the tokens it was sent.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlencode

import requests
import urllib3  # 2.x, or the 1.26 of Miro's SDK (requirements-sdk.txt): both work
from requests.utils import (
    DEFAULT_CA_BUNDLE_PATH,
    get_auth_from_url,
    prepend_scheme_if_needed,
    select_proxy,
)
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError
from urllib3.util import parse_url
from urllib3.util.proxy import connection_requires_http_tunnel

from settings import Settings
from worker.secret import Secret

if TYPE_CHECKING:  # urllib3 2's name for what a pool answers; 1.26 has no such name
    from urllib3 import BaseHTTPResponse

MAX_BODY_BYTES = 64 * 1024
#: Connections kept to Miro per process: one per worker thread, and more than any worker has.
POOL_SIZE = 256
#: The most kept of Miro's error code, and of its message.
ERROR_CODE_CHARS = 60
ERROR_MESSAGE_CHARS = 200
DEFAULT_RATE_LIMIT_WAIT = 60.0
MAX_RATE_LIMIT_WAIT = 3600.0
#: An X-RateLimit-Reset above this is in milliseconds (seconds would be the year 5138).
MILLISECOND_EPOCH = 1e11
#: Used when a successful answer carries no usable ``expires_in`` (Miro documents 3599).
DEFAULT_ACCESS_LIFETIME = 3599
MAX_ACCESS_LIFETIME = 366 * 86400

#: The settings without which no call goes to Miro.
APP_CREDENTIALS = ("MIRO_CLIENT_ID", "MIRO_CLIENT_SECRET")

#: A 4xx that is no refusal: the request timed out before the server looked at it.
REQUEST_TIMEOUT = 408
#: A run of token characters this long, with a digit in it, is hidden as a token: one the
#: call did not send (another user's, a new one) cannot be scrubbed by its value.
_TOKEN_SHAPED = re.compile(r"[A-Za-z0-9._~+/=-]{24,}")


class MiroError(Exception):
    """A call to Miro failed. ``status`` and ``reason`` (what Miro said, made safe) are kept.

    Its text is what the operator sees everywhere (the record's last error, logs, task
    results, the CLI, webhooks, web pages), so it holds no secret.
    """

    def __init__(self, message: str, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        detail = f"HTTP {self.status}: " if self.status else ""
        reason = f" ({self.reason})" if self.reason else ""
        return f"{detail}{self.args[0]}{reason}"


class Transient(MiroError):
    """Worth retrying: nothing says the credential is bad."""


class RateLimited(MiroError):
    """Miro asks us to slow down until ``retry_at`` (epoch seconds)."""

    def __init__(self, message: str, retry_at: float, status: int = 429, reason: str = "") -> None:
        super().__init__(message, status, reason)
        self.retry_at = retry_at


class Refused(MiroError):
    """Miro refused the call (a 4xx): the grant, the code, or the app's own credentials.

    Which one, the refusal does not say: see :mod:`worker.evidence`.
    """


class Said(NamedTuple):
    """What a failed answer said, cut down to what is safe to store, log and show."""

    #: Miro's ``code`` (RFC 6749's ``error``), scrubbed and bounded; "" if none.
    code: str
    #: Miro's ``message`` (RFC 6749's ``error_description``), scrubbed and bounded.
    message: str
    #: How it reads for the operator: ``code: message``, or what the body was, never its text.
    text: str


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


def _route(url: str) -> tuple[urllib3.HTTPConnectionPool, str]:
    """The pool of kept-alive connections that reaches ``url``, and what precedes a path.

    Calls go to the pool directly: a manager would find it again for every call (parse the
    URL, build the pool's key, look it up under a lock), 110 µs of a refresh's CPU here.
    Through a proxy the pool is the one the manager makes for ``url``: an ``https`` URL is
    tunnelled and its request lines carry paths; a plain ``http`` URL is forwarded, so its
    request lines carry the whole URL and the pool adds the proxy's headers.
    """
    manager = _pool_manager(url)
    pool = manager.connection_from_url(url)
    parsed = parse_url(url)
    if isinstance(manager, urllib3.ProxyManager) and not connection_requires_http_tunnel(
        manager.proxy, manager.proxy_config, parsed.scheme
    ):
        return pool, url
    return pool, parsed.path or ""


def _pool_manager(url: str) -> urllib3.PoolManager:
    """Connections to ``url``'s host, through the proxy and CA bundle the environment names.

    requests' own logic reads the variables, so they mean what they mean to requests:
    ``HTTP(S)_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` in either case, ``REQUESTS_CA_BUNDLE``
    or ``CURL_CA_BUNDLE``, certifi's bundle by default. They are read once: requests reads
    them again, and looks for ``~/.netrc``, on every call (1.3 ms of CPU per refresh here).
    The threads of a process share the pool: it keeps up to ``POOL_SIZE`` connections, one per
    worker thread, and a thread never waits for a free one.
    """
    with requests.Session() as session:
        environment = session.merge_environment_settings(url, {}, None, None, None)
    verify = environment["verify"]
    bundle = verify if isinstance(verify, str) else DEFAULT_CA_BUNDLE_PATH
    pools: dict[str, Any] = {
        "maxsize": POOL_SIZE,
        "block": False,
        "cert_reqs": "CERT_REQUIRED",
        "ca_cert_dir" if os.path.isdir(bundle) else "ca_certs": bundle,
    }
    proxy = select_proxy(url, environment["proxies"])
    if not proxy:
        return urllib3.PoolManager(**pools)
    proxy = prepend_scheme_if_needed(proxy, "http")
    username, password = get_auth_from_url(proxy)
    login = urllib3.make_headers(proxy_basic_auth=f"{username}:{password}") if username else None
    return urllib3.ProxyManager(proxy, proxy_headers=login, **pools)


class MiroClient:
    """Calls to Miro's OAuth endpoints over one pool of kept-alive connections.

    urllib3's pool for Miro's host directly, not requests: a refresh costs 1.8 ms of CPU
    through a ``requests.Session``, 1.0 ms through urllib3's ``PoolManager`` and 0.11 ms
    less through the pool itself (64 threads), and refreshes are most of the worker's work.
    No call is ever retried and no redirect followed: a refresh token is single-use, so a
    second try of a POST Miro may have processed kills the grant, and a
    secret-bearing POST must not go to another host.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app_configured = bool(settings.miro_client_id and settings.miro_client_secret)
        self.api_url = settings.miro_api_url
        self.auth_url = settings.miro_auth_url
        self.client_id = settings.miro_client_id or ""
        self._client_secret = Secret(settings.miro_client_secret or "")
        self.redirect_uri = settings.miro_redirect_uri or ""
        self.timeout = settings.http_timeout
        self._pool, self._path_prefix = _route(self.api_url)

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

    def refresh(self, refresh_token: Secret, *, hide: Sequence[Secret | None] = ()) -> TokenGrant:
        """Step 4: trade a refresh token for a new pair. The old pair dies on success.

        ``hide``: the credential's other tokens, which an error must not quote either.
        """
        token = refresh_token.reveal()
        return self._token_call(
            {"grant_type": "refresh_token", "refresh_token": token}, secrets=_revealed(token, hide)
        )

    def token_info(
        self, access_token: Secret, *, hide: Sequence[Secret | None] = ()
    ) -> dict[str, Any]:
        """``GET /v1/oauth-token``: who the token belongs to and its scopes.

        It needs no client secret and spends nothing: a refusal means Miro no longer honours
        the access token.
        """
        token = access_token.reveal()
        response = self._send(
            "GET",
            "/v1/oauth-token",
            headers={"Authorization": f"Bearer {token}"},
            secrets=_revealed(token, hide),
        )
        body = _read_json(response)
        if not isinstance(body, dict):
            raise Transient("token info is not a JSON object", response.status)
        return body

    def whose(self, access_token: Secret, *, hide: Sequence[Secret | None] = ()) -> tuple[str, str]:
        """The team id and user id of an access token, asked of Miro's token info.

        Raises:
            MiroError: Miro could not be asked, refused the token, or named no team or user
                (as ``Transient``: an odd answer, worth asking again).
        """
        info = self.token_info(access_token, hide=hide)
        team_id, user_id = _nested_id(info, "team"), _nested_id(info, "user")
        if team_id is None or user_id is None:
            raise Transient("token info names no team id or no user id")
        return team_id, user_id

    def revoke(self, access_token: Secret, *, hide: Sequence[Secret | None] = ()) -> None:
        """``POST /v2/oauth/revoke``: ends the grant (its refresh token too).

        ``hide``: the credential's other tokens, which an error must not quote either.

        Raises:
            Refused: Miro did not revoke it: a token it does not know (gone already, or
                expired), or the app's credentials refused.
        """
        token = access_token.reveal()
        body = {
            "accessToken": token,
            "clientId": self.client_id,
            "clientSecret": self._client_secret.reveal(),
        }
        response = self._send(
            "POST",
            "/v2/oauth/revoke",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
            secrets=_revealed(token, hide),
        )
        _read_body(response)  # unused, but read to hand the connection back to the pool

    def _token_call(self, params: dict[str, str], secrets: tuple[str, ...]) -> TokenGrant:
        form = {
            "client_id": self.client_id,
            "client_secret": self._client_secret.reveal(),
            **params,
        }
        response = self._send(
            "POST",
            "/v1/oauth/token",
            body=urlencode(form),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            secrets=secrets,
        )
        return parse_token_response(_read_json(response), response.status)

    def _send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        secrets: tuple[str, ...],
        body: str | None = None,
    ) -> BaseHTTPResponse:
        """One try of ``method path``; a 2xx answer is returned with its body still unread.

        Raises:
            MiroError: no answer, a redirect (not followed) or a 4xx or 5xx, classified.
            SettingsError: the app's client id or secret is not set; nothing was sent.
        """
        if not self._app_configured:
            # Miro would refuse the app, and a refresh would charge that to a user's credential.
            self._settings.require_miro_app(APP_CREDENTIALS)
        try:
            response = self._pool.urlopen(
                method,
                self._path_prefix + path,
                body=body,
                headers=headers,
                timeout=self.timeout,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                enforce_content_length=True,  # urllib3 2's default; 1.26 returns a short body
            )
        except HTTPError as error:
            # The message may hold a URL with a token: only the exception's name is kept.
            # A refused connection is a NewConnectionError, which urllib3 derives from
            # ConnectTimeoutError for compatibility.
            timed_out = isinstance(error, ConnectTimeoutError | ReadTimeoutError)
            if timed_out and not isinstance(error, NewConnectionError):
                raise Transient(f"Miro did not answer {path} within {self.timeout:g} s") from None
            raise Transient(f"cannot reach Miro at {path}: {type(error).__name__}") from None
        except ValueError as error:
            # http.client refuses a header value with a line break, quoting it: the token.
            raise Transient(f"cannot send {path}: {type(error).__name__}") from None
        if response.status < 300:
            return response
        said = _said_by(response, (*secrets, self._client_secret.reveal()))
        if response.status < 400:
            raise Transient(
                f"Miro answered {path} with a redirect, not followed", response.status, said.text
            )
        raise classify(response.status, said, response.headers)


def classify(status: int, said: Said, headers: Any, now: float | None = None) -> MiroError:
    """Turn a failed answer into the error kind that decides what happens next.

    By its status alone: what Miro says is kept for the operator, never read.
    """
    now = time.time() if now is None else now
    if status == 429:
        return RateLimited("rate limited by Miro", _retry_at(headers, now), status, said.text)
    if status >= 500 or status == REQUEST_TIMEOUT:
        return Transient("Miro failed", status, said.text)
    return Refused("Miro refused the call", status, said.text)


def what_miro_said(body: bytes, secrets: Sequence[str] = ()) -> Said:
    """Miro's error code and message from a failed answer's body, safe to keep.

    Miro's shape is ``{"status", "code", "message", "type"}``, RFC 6749's ``{"error",
    "error_description"}``; any other field, and any body that is not such an object, is
    dropped unread. The two fields are scrubbed of ``secrets`` (every secret of the call),
    of anything shaped like a token, and of control characters, then cut short.
    """
    fields = _json_object(body)
    if fields is None:
        return Said("", "", f"a body of {len(body)} bytes, not a JSON object" if body else "")
    code = _safe(_first_string(fields, "code", "error"), secrets, ERROR_CODE_CHARS)
    message = _safe(
        _first_string(fields, "message", "error_description"), secrets, ERROR_MESSAGE_CHARS
    )
    text = ": ".join(part for part in (code, message) if part)
    return Said(code, message, text or f"a JSON object of {len(body)} bytes, without a message")


def _said_by(response: BaseHTTPResponse, secrets: Sequence[str]) -> Said:
    try:
        body = _read_body(response)
    except Transient as unreadable:
        return Said("", "", unreadable.args[0])
    return what_miro_said(body, secrets)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return fields if isinstance(fields, dict) else None


def _first_string(fields: dict[str, Any], *names: str) -> str:
    return next((fields[name] for name in names if isinstance(fields.get(name), str)), "")


def _safe(text: str, secrets: Sequence[str], limit: int) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _TOKEN_SHAPED.sub(_hide_token, text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hide_token(match: re.Match[str]) -> str:
    run = match.group()
    return "***" if any(c.isdigit() for c in run) else run


def _nested_id(info: dict[str, Any], part: str) -> str | None:
    """``info[part]["id"]`` as a string, if it is an id (JSON may carry it as a number)."""
    value = info.get(part)
    found = value.get("id") if isinstance(value, dict) else None
    if isinstance(found, bool) or not isinstance(found, int | str) or found == "":
        return None
    return str(found)


def _revealed(token: str, others: Sequence[Secret | None]) -> tuple[str, ...]:
    return (token, *(other.reveal() for other in others if other is not None))


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


def _read_body(response: BaseHTTPResponse) -> bytes:
    """The body, refusing to hold more than ``MAX_BODY_BYTES`` of it in memory.

    A body read to its end hands the connection back to the pool for the next call; one
    left unread (too large, broken off) is closed, for its rest must not be read as the next
    call's answer, and its place in the pool handed back empty.
    """
    chunks, size, complete = [], 0, False
    try:
        for chunk in response.stream(8192):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise Transient(f"Miro's answer exceeds {MAX_BODY_BYTES} bytes", response.status)
            chunks.append(chunk)
        complete = True
    except HTTPError as error:
        raise Transient(f"Miro's answer broke off: {type(error).__name__}") from None
    finally:
        if not complete:
            response.close()
        response.release_conn()
    return b"".join(chunks)


def _read_json(response: BaseHTTPResponse) -> Any:
    body = _read_body(response)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON, too deep, a number of 5000 digits
        # A 2xx that is not JSON may still have rotated the grant: never echo it back.
        raise Transient(
            f"Miro answered HTTP {response.status} with a body that is not JSON "
            f"({len(body)} bytes, content type {response.headers.get('Content-Type')!r})",
            response.status,
        ) from None


def parse_token_response(body: Any, status: int | None = None) -> TokenGrant:
    """Check a token response field by field.

    ``status`` is that of Miro's answer; a response an integrator imports has none.

    A grant whose ``access_token`` is usable is always kept, even when other fields are off:
    after a refresh it may be the only copy of the new pair. Problems with the other fields
    become a ``warning`` and safe defaults.

    Raises:
        Transient: no usable access token (Miro may or may not have rotated; the next try
            with the old refresh token tells).
    """
    if not isinstance(body, dict):
        raise Transient(f"the token response is a JSON {_json_kind(body)}, not an object", status)
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise Transient(
            "the token response has no access_token string "
            f"(fields: {', '.join(sorted(map(str, body))[:12]) or 'none'})",
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


def _json_kind(value: Any) -> str:
    """What JSON calls the type of a decoded value."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


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
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 < value <= MAX_ACCESS_LIFETIME
    ):
        warnings.append(
            f"expires_in {str(value)[:20]!r} is not a positive number of seconds up to "
            f"{MAX_ACCESS_LIFETIME}; assumed {DEFAULT_ACCESS_LIFETIME}"
        )
        return DEFAULT_ACCESS_LIFETIME
    return value
