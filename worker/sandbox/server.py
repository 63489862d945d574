"""The Miro sandbox over HTTP: Miro's OAuth endpoints plus ``/_sandbox/`` controls.

The Miro endpoints answer like Miro (paths, parameters, JSON shapes, status codes and
token rotation, per ``miro-oauth-facts.md``) so a client that works here makes the same
requests against Miro. ``/_sandbox/`` is for tests and benchmarks: counters, grant
listings, seeding, uninstalls and faults. It exposes every token, so bind the sandbox to
a loopback address.

Nothing here logs a request line, a parameter or a body: tokens travel in all of them.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import json
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from flask import Flask, Response, g, request
from werkzeug.datastructures import MultiDict

from worker.hosts import HostAllowlist
from worker.sandbox.faults import FaultInjector, Faults
from worker.sandbox.grants import (
    DEFAULT_TEAM_ID,
    SCOPE,
    Grant,
    GrantStore,
    InvalidGrantError,
    InvalidTokenError,
    RedirectMismatchError,
)
from worker.sandbox.serving import SandboxServer

Dialect = Literal["miro", "rfc6749", "uniform"]
#: How the sandbox words its refusals where Miro does not document them: ``miro`` as the
#: sandbox guesses Miro does, ``rfc6749`` as the RFC's token endpoint does, ``uniform`` with
#: every refusal of every endpoint alike (:data:`UNIFORM_REFUSAL`), so that a client that
#: copes with all three relies on no wording.
DIALECTS: tuple[Dialect, ...] = ("miro", "rfc6749", "uniform")
UNIFORM_REFUSAL = {"status": 401, "code": "oauthError", "message": "Unauthorized", "type": "error"}
Reply = tuple[str, int, dict[str, str]]
"""What a view returns: body, status and headers."""

_SIXTY_DAYS_S = 60 * 24 * 3600
_RATE_LIMIT = "100000"
_HOLD_POLL_S = 0.02
"""Credits per minute advertised in ``X-RateLimit-Limit``, Miro's global default."""

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
"""RFC 6749 5.1: token responses must not be cached."""

_ORGANIZATION = {
    "type": "organization",
    "id": "3458764500000000100",
    "name": "Sandbox organization",
}
"""The organization every sandbox team is in, as Miro's token info names it."""

_ECHOING_PATHS = frozenset({"/v1/oauth/token", "/v1/oauth-token", "/v2/oauth/revoke"})
"""The endpoints whose errors the ``echo_tokens`` fault makes quote tokens."""
_CARRIED_FIELDS = ("code", "refresh_token", "client_secret", "accessToken", "clientSecret")
"""The parameters that carry secrets, in a form, a query string or a JSON body."""

_BAD_GATEWAY_PAGE = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center></body></html>"
)


@dataclass(frozen=True)
class SandboxConfig:
    """The app the sandbox knows, and the lifetimes of the tokens it issues.

    Attributes:
        client_id: The app's client id.
        client_secret: The app's client secret.
        access_ttl: Access token lifetime in seconds; sent as ``expires_in``.
        refresh_ttl: Refresh token lifetime in seconds, restarted by each rotation.
        dialect: How refusals are worded at the start (see :data:`DIALECTS`); it can be
            changed while the sandbox runs (``POST /_sandbox/dialect``), and ``reset``
            brings this one back.
        clock: Time source for all expiry decisions; tests pass a fake clock.
    """

    client_id: str
    client_secret: str
    access_ttl: int = 3599
    refresh_ttl: int = _SIXTY_DAYS_S
    dialect: Dialect = "miro"
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        """Refuse settings the endpoints cannot honour."""
        _check_dialect(self.dialect)
        if self.access_ttl <= 0 or self.refresh_ttl <= 0:
            raise ValueError("token lifetimes must be positive")


class _ErrorSpec(NamedTuple):
    """How one token endpoint failure is answered in each error style."""

    miro_status: int
    miro_code: str
    rfc_status: int
    rfc_error: str
    message: str


class _TokenError(enum.Enum):
    """Token endpoint failures."""

    INVALID_CLIENT = _ErrorSpec(
        401,
        "unauthorized",
        401,
        "invalid_client",
        "Client authentication failed: invalid client id or secret",
    )
    INVALID_REFRESH_TOKEN = _ErrorSpec(
        400, "invalidGrant", 400, "invalid_grant", "Invalid refresh token"
    )
    INVALID_CODE = _ErrorSpec(
        400, "invalidGrant", 400, "invalid_grant", "Invalid authorization code"
    )
    REDIRECT_MISMATCH = _ErrorSpec(
        401, "oauthError", 400, "invalid_grant", "Redirect URI mismatch."
    )
    MISSING_PARAMETER = _ErrorSpec(
        400, "invalidParameters", 400, "invalid_request", "Missing parameter"
    )
    UNSUPPORTED_GRANT_TYPE = _ErrorSpec(
        400, "invalidParameters", 400, "unsupported_grant_type", "Unsupported grant type"
    )


def _check_dialect(dialect: object) -> Dialect:
    """Return ``dialect`` if the sandbox speaks it, else raise ``ValueError``."""
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}")
    return dialect


def _json(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    """Return a JSON response that keeps the key order Miro uses (Flask would sort keys)."""
    body = json.dumps(payload, separators=(",", ":"))
    return body, status, {"Content-Type": "application/json", **(headers or {})}


def _miro_error(status: int, code: str, message: str) -> Reply:
    """Return an error in Miro's shape."""
    return _json({"status": status, "code": code, "message": message, "type": "error"}, status)


def _sandbox_error(status: int, message: str) -> Reply:
    """Return an error from a ``/_sandbox/`` endpoint."""
    return _json({"error": message}, status)


def _host_check(hosts: HostAllowlist) -> Callable[[], Reply | None]:
    """A ``before_request`` refusing a ``Host`` the sandbox does not serve.

    ``/_sandbox/`` shows every token: a page whose name was rebound to 127.0.0.1 (DNS
    rebinding) must not read it.
    """

    def check() -> Reply | None:
        if hosts.allows(request.host):
            return None
        return _sandbox_error(400, "the sandbox answers only to its address and to localhost")

    return check


def _html_error(message: str) -> Reply:
    """Return the 400 page shown instead of redirecting to an unverified ``redirect_uri``."""
    page = f"<html><body><h1>Authorization failed</h1><p>{message}</p></body></html>"
    return page, 400, {"Content-Type": "text/html; charset=utf-8"}


def exchange_response(grant: Grant, access_ttl: int) -> dict[str, Any]:
    """Return the body of a code exchange, field for field as Miro's guide shows it."""
    return {
        "user_id": grant.user_id,
        "refresh_token": grant.refresh_token,
        "access_token": grant.access_token,
        "expires_in": access_ttl,
        "team_id": grant.team_id,
        "scope": SCOPE,
        "token_type": "bearer",
    }


def refresh_response(grant: Grant, access_ttl: int) -> dict[str, Any]:
    """Return the body of a refresh as Miro's reference shows it.

    ``team_id`` is a bare JSON number above 2^53 (``json`` writes Python ints exactly) and
    there is no ``user_id``: clients must keep ids as strings and remember the user.
    """
    return {
        "token_type": "bearer",
        "team_id": int(grant.team_id),
        "access_token": grant.access_token,
        "refresh_token": grant.refresh_token,
        "scope": SCOPE,
        "expires_in": access_ttl,
    }


def _client_gone() -> bool:
    """Whether the client hung up while its call was served (killed, or timed out).

    Like Miro, the sandbox finishes the work anyway; it only notes that the answer will
    reach nobody, so tests can tell these unavoidable losses from a client's bugs.
    """
    connection = request.environ.get("werkzeug.socket")
    if not isinstance(connection, socket.socket):
        return False
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _bearer_token() -> str | None:
    """Return the Bearer token of the current request, if it has one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _redirect(redirect_uri: str, params: Mapping[str, str]) -> Reply:
    """Send the browser back to the app with ``params`` added to ``redirect_uri``."""
    parts = urlsplit(redirect_uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return "", 302, {"Location": urlunsplit(parts._replace(query=urlencode(query)))}


def _optional_id(body: Mapping[str, Any], name: str) -> str | None:
    """Return an id from a JSON body as a string; JSON may carry it as a number."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{name} must be a string or an integer")
    return str(value)


def _json_body() -> dict[str, Any]:
    """Return the request's JSON object body, or an empty dict if it has none."""
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


class _MiroApi:
    """The view functions, bound to one sandbox's config, state, faults and sleeper.

    Args:
        config: The app and token lifetimes.
        store: Grants, codes and counters.
        faults: The faults in force.
        sleep: Waits a number of seconds; the sandbox cuts it short when it stops, so a
            hung request never holds up shutdown.
    """

    def __init__(
        self,
        config: SandboxConfig,
        store: GrantStore,
        faults: FaultInjector,
        sleep: Callable[[float], object],
    ) -> None:
        self._config = config
        self._store = store
        self._faults = faults
        self._sleep = sleep
        self.dialect: Dialect = config.dialect

    def register(self, app: Flask) -> None:
        """Attach the endpoints to ``app``."""
        app.before_request(self.add_latency)
        app.after_request(self.echo_tokens)
        routes: list[tuple[str, Callable[..., Reply], list[str]]] = [
            ("/oauth/authorize", self.authorize, ["GET"]),
            ("/v1/oauth/token", self.token, ["POST"]),
            ("/v1/oauth-token", self.token_info, ["GET"]),
            ("/v2/oauth/revoke", self.revoke, ["POST"]),
            ("/v2/boards/<board_id>", self.board, ["GET"]),
            ("/_sandbox/stats", self.sandbox_stats, ["GET"]),
            ("/_sandbox/grants", self.sandbox_grants, ["GET"]),
            ("/_sandbox/grants", self.sandbox_create_grants, ["POST"]),
            ("/_sandbox/revoke_grant", self.sandbox_revoke_grant, ["POST"]),
            ("/_sandbox/reset", self.sandbox_reset, ["POST"]),
            ("/_sandbox/faults", self.sandbox_faults, ["GET", "POST"]),
            ("/_sandbox/dialect", self.sandbox_dialect, ["GET", "POST"]),
        ]
        for rule, view, methods in routes:
            app.add_url_rule(rule, f"{view.__name__}_{methods[0]}", view, methods=methods)

    def add_latency(self) -> None:
        """Delay every Miro endpoint by ``latency_ms``; ``/_sandbox/`` stays fast."""
        latency_ms = self._faults.current.latency_ms
        if latency_ms > 0 and not request.path.startswith("/_sandbox/"):
            self._sleep(latency_ms / 1000.0)

    def echo_tokens(self, response: Response) -> Response:
        """With ``echo_tokens``, make an error of a token endpoint quote the call's secrets.

        The secrets the call carried and both tokens of the grant they name (or of the pair
        a lost refresh made) go into the message and into a ``context`` field of a JSON
        error, and onto the end of any other.
        """
        echoing = self._faults.current.echo_tokens and request.path in _ECHOING_PATHS
        if not echoing or response.status_code < 400:
            return response
        tokens = self._echoed_tokens()
        quoted = f"(tokens: {' '.join(tokens)})"
        body = json.loads(response.get_data()) if response.is_json else None
        if isinstance(body, dict):
            text = "message" if "message" in body else "error_description"
            body = {**body, text: f"{body.get(text, '')} {quoted}", "context": {"tokens": tokens}}
            response.set_data(json.dumps(body))
        else:
            response.set_data(response.get_data() + quoted.encode())
        return response

    def _echoed_tokens(self) -> list[str]:
        """The secrets the current call carried, and the tokens of the grants they name."""
        fields = {**request.values.to_dict(), **_json_body()}
        carried = [fields.get(name) for name in _CARRIED_FIELDS] + [_bearer_token()]
        secrets = [value for value in carried if isinstance(value, str) and value]
        grants = [self._store.holder(secret) for secret in secrets] + [g.get("issued")]
        named = [t for grant in grants if grant for t in (grant.access_token, grant.refresh_token)]
        return list(dict.fromkeys(secrets + named))

    def reset(self) -> None:
        """Forget all grants, codes and counters, turn every fault off, speak the first dialect."""
        self._store.reset()
        self._faults.replace(Faults())
        self.dialect = self._config.dialect

    def set_dialect(self, dialect: object) -> Dialect:
        """Word refusals in ``dialect`` from now on.

        Raises:
            ValueError: The sandbox does not speak it.
        """
        self.dialect = _check_dialect(dialect)
        return self.dialect

    def _refused(self, status: int, code: str, message: str) -> Reply:
        """A refusal in Miro's shape, or the uniform one in that dialect."""
        if self.dialect == "uniform":
            return _json(UNIFORM_REFUSAL, 401)
        return _miro_error(status, code, message)

    # Miro endpoints

    def authorize(self) -> Reply:
        """``GET /oauth/authorize``: approve at once and redirect back with a code.

        ``user_id`` is a sandbox extension that picks the approving user, so a test can
        install the app for the same user twice or in two teams.
        """
        args = request.args
        if args.get("client_id") != self._config.client_id:
            return _html_error("Unknown client_id.")
        if args.get("response_type") != "code":
            return _html_error("response_type must be code.")
        redirect_uri = args.get("redirect_uri")
        if not redirect_uri:
            return _html_error("redirect_uri is required.")
        state = {"state": args["state"]} if "state" in args else {}
        if self._faults.current.deny_authorize:
            denial = {"error": "access_denied", "error_description": "The user denied access."}
            return _redirect(redirect_uri, {**denial, **state})
        team_id = args.get("team_id") or DEFAULT_TEAM_ID
        try:
            code = self._store.issue_code(redirect_uri, team_id, args.get("user_id"))
        except ValueError as exc:
            return _html_error(str(exc))
        params = {"code": code, **state, "client_id": self._config.client_id, "team_id": team_id}
        return _redirect(redirect_uri, params)

    def token(self) -> Reply:
        """``POST /v1/oauth/token``: exchange a code or rotate a refresh token.

        Parameters come from the form body or the query string, as Miro accepts both.
        Injected faults strike before the client is even authenticated, like a failing
        gateway in front of Miro.
        """
        self._store.count("token_calls")
        self._store.adjust("token_in_flight", 1)
        try:
            self._wait_while_held()
            return self._token(self._faults.current)
        finally:
            self._store.adjust("token_in_flight", -1)

    def _wait_while_held(self) -> None:
        if not self._faults.current.hold:
            return
        self._store.adjust("held", 1)
        try:
            while self._faults.current.hold and not self._sleep(_HOLD_POLL_S):
                pass
        finally:
            self._store.adjust("held", -1)

    def _token(self, faults: Faults) -> Reply:
        injected = self._injected_failure(faults)
        if injected is not None:
            return injected
        params = request.values
        if not self._client_ok(params.get("client_id"), params.get("client_secret")):
            return self._token_error(_TokenError.INVALID_CLIENT)
        grant_type = params.get("grant_type")
        if grant_type == "authorization_code":
            return self._exchange(params)
        if grant_type == "refresh_token":
            return self._refresh(params, faults)
        if not grant_type:
            return self._token_error(_TokenError.MISSING_PARAMETER, "grant_type")
        return self._token_error(_TokenError.UNSUPPORTED_GRANT_TYPE)

    def _bearer_grant(self, invalid_status: int) -> Grant | Reply:
        """The grant whose current access token is the Bearer, or the error to answer."""
        token = _bearer_token()
        if token is None:
            return self._refused(401, "tokenNotProvided", "No access token provided")
        try:
            return self._store.authenticate(token)
        except InvalidTokenError:
            return self._refused(invalid_status, "invalidToken", "Invalid token provided")

    def token_info(self) -> Reply:
        """``GET /v1/oauth-token``: who a token belongs to; 400 for an invalid token."""
        if self._faults.current.token_info_fails:
            return _miro_error(500, "internalError", "Internal server error")
        grant = self._bearer_grant(400)
        if not isinstance(grant, Grant):
            return grant
        user = {"type": "user", "id": grant.user_id, "name": f"Sandbox user {grant.user_id}"}
        return _json(
            {
                "type": "oauth_token",
                "organization": _ORGANIZATION,
                "team": {"type": "team", "id": grant.team_id, "name": "Sandbox team"},
                "user": user,
                "createdBy": user,
                "scopes": SCOPE.split(),
            }
        )

    def revoke(self) -> Reply:
        """``POST /v2/oauth/revoke``: end a grant, its refresh token included.

        Whether Miro revokes an expired access token is not documented: the sandbox assumes
        not, and answers it as a token it does not know.
        """
        body = _json_body()
        access_token = body.get("accessToken")
        if not isinstance(access_token, str) or not access_token:
            return self._refused(400, "invalidParameters", "Missing parameter: accessToken")
        if not self._client_ok(body.get("clientId"), body.get("clientSecret")):
            spec: _ErrorSpec = _TokenError.INVALID_CLIENT.value
            return self._refused(spec.miro_status, spec.miro_code, spec.message)
        if not self._store.revoke(access_token):
            return self._refused(404, "notFound", "Access token not found")
        return "", 204, {}

    def board(self, board_id: str) -> Reply:
        """``GET /v2/boards/{board_id}``: any board exists for a current access token."""
        self._store.count("board_calls")
        grant = self._bearer_grant(401)
        if not isinstance(grant, Grant):
            return grant
        owner = {"id": grant.user_id, "type": "user", "name": f"Sandbox user {grant.user_id}"}
        name = f"Sandbox board {board_id}"
        return _json(
            {"id": board_id, "type": "board", "name": name, "description": "", "owner": owner}
        )

    # Sandbox controls

    def sandbox_stats(self) -> Reply:
        """``GET /_sandbox/stats``: the counters."""
        return _json(self._store.stats())

    def sandbox_grants(self) -> Reply:
        """``GET /_sandbox/grants``: every grant with its current tokens."""
        return _json([grant.as_dict() for grant in self._store.grants()])

    def sandbox_create_grants(self) -> Reply:
        """``POST /_sandbox/grants`` ``{"count", "team_id"?}``: seed grants, no exchange."""
        body = _json_body()
        count = body.get("count")
        if isinstance(count, bool) or not isinstance(count, int):
            return _sandbox_error(400, "count must be an integer")
        try:
            team_id = _optional_id(body, "team_id") or DEFAULT_TEAM_ID
            grants = self._store.create_grants(count, team_id)
        except ValueError as exc:
            return _sandbox_error(400, str(exc))
        ttl = self._config.access_ttl
        return _json({"responses": [exchange_response(grant, ttl) for grant in grants]})

    def sandbox_revoke_grant(self) -> Reply:
        """``POST /_sandbox/revoke_grant`` ``{"team_id", "user_id"}``: the user uninstalls."""
        body = _json_body()
        try:
            team_id = _optional_id(body, "team_id")
            user_id = _optional_id(body, "user_id")
        except ValueError as exc:
            return _sandbox_error(400, str(exc))
        if team_id is None or user_id is None:
            return _sandbox_error(400, "team_id and user_id are required")
        if not self._store.revoke_grant(team_id, user_id):
            return _sandbox_error(404, "no live grant for this user in this team")
        return "", 204, {}

    def sandbox_reset(self) -> Reply:
        """``POST /_sandbox/reset``: forget all grants, codes and counters; no faults."""
        self.reset()
        return "", 204, {}

    def sandbox_dialect(self) -> Reply:
        """``GET``/``POST /_sandbox/dialect`` ``{"dialect"}``: read or change the wording."""
        if request.method == "POST":
            try:
                self.set_dialect(_json_body().get("dialect"))
            except ValueError as exc:
                return _sandbox_error(400, str(exc))
        return _json({"dialect": self.dialect})

    def sandbox_faults(self) -> Reply:
        """``GET``/``POST /_sandbox/faults``: read or change the faults, answer the result."""
        if request.method == "POST":
            try:
                self._faults.update(**_json_body())
            except (TypeError, ValueError) as exc:
                return _sandbox_error(400, str(exc))
        return _json(self._faults.current.as_dict())

    # Token endpoint internals

    def _client_ok(self, client_id: object, client_secret: object) -> bool:
        """Check the app's credentials, in constant time so the secret cannot be timed."""
        if not isinstance(client_id, str) or not isinstance(client_secret, str):
            return False
        id_ok = hmac.compare_digest(client_id.encode(), self._config.client_id.encode())
        secret_ok = hmac.compare_digest(client_secret.encode(), self._config.client_secret.encode())
        return id_ok and secret_ok

    def _exchange(self, params: MultiDict[str, str]) -> Reply:
        """Redeem an authorization code."""
        code = params.get("code")
        if not code:
            return self._token_error(_TokenError.MISSING_PARAMETER, "code")
        redirect_uri = params.get("redirect_uri")
        if not redirect_uri:
            return self._token_error(_TokenError.MISSING_PARAMETER, "redirect_uri")
        try:
            grant = self._store.exchange(code, redirect_uri)
        except InvalidGrantError:
            return self._token_error(_TokenError.INVALID_CODE)
        except RedirectMismatchError:
            return self._token_error(_TokenError.REDIRECT_MISMATCH)
        answer = exchange_response(grant, self._config.access_ttl)
        if self._faults.current.omit_ids:
            del answer["user_id"], answer["team_id"]
        return _json(answer, headers=_NO_STORE)

    def _refresh(self, params: MultiDict[str, str], faults: Faults) -> Reply:
        """Rotate a refresh token, unless a fault rejects it or loses the answer."""
        if faults.reject_all_refresh:
            return self._token_error(_TokenError.INVALID_CLIENT)
        refresh_token = params.get("refresh_token")
        if not refresh_token:
            return self._token_error(_TokenError.MISSING_PARAMETER, "refresh_token")
        lose = self._faults.draw(faults.lose_rate)
        abandoned = _client_gone()
        try:
            grant = self._store.refresh(refresh_token, lost=lose, abandoned=abandoned)
        except InvalidGrantError:
            return self._token_error(_TokenError.INVALID_REFRESH_TOKEN)
        if lose:
            g.issued = grant  # for echo_tokens: the pair the lost answer carried
            return self._undelivered(faults)
        if abandoned or _client_gone():
            self._store.orphan(refresh_token, grant)
        return _json(refresh_response(grant, self._config.access_ttl), headers=_NO_STORE)

    def _injected_failure(self, faults: Faults) -> Reply | None:
        """Answer a token call with an injected 500 or 429, or stall it; else ``None``."""
        if self._faults.draw(faults.error_rate):
            self._store.count("errors_injected")
            return _miro_error(500, "internalError", "Internal server error")
        if self._faults.draw(faults.rate_limit_rate):
            self._store.count("rate_limited")
            return self._rate_limited(faults.rate_limit_reset_s)
        if self._faults.draw(faults.hang_rate):
            self._store.count("hung")
            self._store.adjust("hanging", 1)
            try:
                self._sleep(faults.hang_s)
            finally:
                self._store.adjust("hanging", -1)
        return None

    def _rate_limited(self, reset_s: float) -> Reply:
        """Return Miro's 429 with its rate-limit headers and a ``Retry-After``."""
        body = {
            "status": 429,
            "code": "tooManyRequests",
            "message": "Request rate limit exceed",
            "context": None,
            "type": "error",
        }
        headers = {
            "X-RateLimit-Limit": _RATE_LIMIT,
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(math.ceil(self._config.clock() + reset_s)),
            "Retry-After": str(math.ceil(reset_s)),
        }
        return _json(body, 429, headers)

    def _undelivered(self, faults: Faults) -> Reply:
        """Fail to deliver a rotation that already happened: a 502 page or a cut line."""
        drop = faults.lose_mode == "drop" or (
            faults.lose_mode == "mixed" and self._faults.draw(0.5)
        )
        connection = request.environ.get("werkzeug.socket")
        if drop and isinstance(connection, socket.socket):
            # The client sees the connection close without an answer; werkzeug's write
            # then fails with a broken pipe, which it treats as a dropped client. The
            # client may have hung up first, which is just as good.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        return _BAD_GATEWAY_PAGE, 502, {"Content-Type": "text/html"}

    def _token_error(self, error: _TokenError, parameter: str | None = None) -> Reply:
        """Return a token endpoint error in the dialect spoken now."""
        spec: _ErrorSpec = error.value
        message = spec.message if parameter is None else f"{spec.message}: {parameter}"
        if self.dialect == "uniform":
            return _json(UNIFORM_REFUSAL, 401, _NO_STORE)
        if self.dialect == "rfc6749":
            body: dict[str, Any] = {"error": spec.rfc_error, "error_description": message}
            return _json(body, spec.rfc_status, _NO_STORE)
        status = spec.miro_status
        body = {"status": status, "code": spec.miro_code, "message": message, "type": "error"}
        return _json(body, status, _NO_STORE)


class Sandbox:
    """A Miro sandbox on a real HTTP port, served from a background thread.

    Use it as ``with Sandbox(config) as sandbox: ...`` or call ``start()`` and ``stop()``;
    ``url`` is the base URL for the auth and the API endpoints alike.

    Args:
        config: The app and token lifetimes.
        faults: Faults in force from the start; none by default.
        host: Address to listen on. Keep it on loopback: ``/_sandbox/`` shows all tokens.
        port: Port to listen on; 0 picks a free one.
    """

    def __init__(
        self,
        config: SandboxConfig,
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._config = config
        self._host = host
        self._port = port
        self._store = GrantStore(config.access_ttl, config.refresh_ttl, config.clock)
        self._faults = FaultInjector(faults or Faults())
        self._stopping = threading.Event()
        self._app = Flask(__name__)
        self._app.before_request(_host_check(HostAllowlist.serving(host)))
        self._api = _MiroApi(config, self._store, self._faults, self._stopping.wait)
        self._api.register(self._app)
        self._server: SandboxServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Listen and serve in a background thread; return ``self`` for chaining.

        Raises:
            RuntimeError: If the sandbox is already running.
            OSError: If the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("the sandbox is already running")
        self._stopping.clear()
        self._server = self._bind()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="miro-sandbox",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; requests stalled by faults are cut short."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections()
        thread.join()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """Base URL of the running sandbox, such as ``http://127.0.0.1:8765``."""
        if self._server is None:
            raise RuntimeError("the sandbox is not running")
        host = self._host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._server.port}"

    @property
    def faults(self) -> Faults:
        """The faults in force."""
        return self._faults.current

    def set_faults(self, **fields: Any) -> Faults:
        """Change some fault settings at run time and return the faults now in force.

        Raises:
            TypeError: For an unknown field or a value of the wrong type.
            ValueError: For a value out of range.
        """
        return self._faults.update(**fields)

    @property
    def dialect(self) -> Dialect:
        """How refusals are worded now."""
        return self._api.dialect

    def set_dialect(self, dialect: Dialect) -> None:
        """Word refusals in ``dialect`` from now on, as ``POST /_sandbox/dialect`` does.

        Raises:
            ValueError: The sandbox does not speak it.
        """
        self._api.set_dialect(dialect)

    def stats(self) -> dict[str, int]:
        """Return the counters, as ``GET /_sandbox/stats`` does."""
        return self._store.stats()

    def grants(self) -> list[dict[str, Any]]:
        """Return every grant with its current tokens, as ``GET /_sandbox/grants`` does."""
        return [grant.as_dict() for grant in self._store.grants()]

    def issued_tokens(self) -> set[str]:
        """Every token ever issued, for tests that prove none of them leaked."""
        return self._store.issued_tokens()

    def grant(self, team_id: str, user_id: str) -> dict[str, Any] | None:
        """Return the grant of one user in one team, or ``None``."""
        grant = self._store.grant(team_id, user_id)
        return None if grant is None else grant.as_dict()

    def create_grants(self, n: int, team_id: str | None = None) -> list[dict[str, Any]]:
        """Create ``n`` grants without authorize or exchange; return exchange responses.

        The responses have the exact shape of a code exchange, so they can be imported
        into a token store as if ``n`` users had installed the app.
        """
        grants = self._store.create_grants(n, team_id or DEFAULT_TEAM_ID)
        return [exchange_response(grant, self._config.access_ttl) for grant in grants]

    def revoke_grant(self, team_id: str, user_id: str) -> bool:
        """Revoke a grant as if its user uninstalled the app; ``False`` if none is live."""
        return self._store.revoke_grant(team_id, user_id)

    def reset(self) -> None:
        """Forget all grants, codes and counters, turn every fault off, speak the first dialect."""
        self._api.reset()

    def __enter__(self) -> Self:
        """Start the sandbox unless it is already running."""
        return self if self._server is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the sandbox."""
        self.stop()

    def _bind(self) -> SandboxServer:
        """Create the listening server.

        Werkzeug reports a failed bind by printing and calling ``sys.exit``; a library
        must not end its host process, so that becomes an ``OSError``.
        """
        try:
            return SandboxServer(self._host, self._port, self._app)
        except SystemExit as exc:
            raise OSError(f"cannot listen on {self._host}:{self._port}") from exc
