"""The web app: the operator's page, the OAuth callback, disconnect, health and metrics.

=========================  =======================================================  ========
route                      what                                                     login
=========================  =======================================================  ========
``GET /``                  the "Connect to Miro" button and the stored credentials  yes
``GET /connect``           redirect to Miro's authorize page with a new state       yes
``GET <callback path>``    the path of MIRO_REDIRECT_URI: check, exchange, store    no
``POST /disconnect``       revoke at Miro and delete (``Vault.revoke``)             yes
``GET /healthz``           Redis reachable and refreshing not paused                no
``GET /metrics``           Prometheus text format                                   yes
=========================  =======================================================  ========

Served by :mod:`worker.web.serving`: one process, a pool of threads.

"login" is ``WEB_BASIC_AUTH`` when set. The callback cannot ask for it: the users an operator
sends a ``connect-url`` link to have no login; the state protects it instead (see
:mod:`worker.web.state`). No page ever shows a token, nor text that a link can put in it.

Every route but ``/healthz`` answers only the hosts the app serves (:mod:`worker.hosts`):
MIRO_REDIRECT_URI's host, the address it listens on and WEB_ALLOWED_HOSTS. ``/healthz``
answers any: load balancers and orchestrators probe it by the machine's own address, and it
holds nothing for a page to read or do.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from datetime import UTC, datetime
from itertools import islice
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import Flask, Response, redirect, render_template, request, session
from prometheus_client import CONTENT_TYPE_LATEST

from worker import miro
from worker.constants import STATE_COUNTS
from worker.credential import CredentialId, InvalidCredentialId
from worker.hosts import HostAllowlist
from worker.status import read_status
from worker.store import NotFoundError
from worker.vault import GrantKept, NotRevoked, Vault, VaultError
from worker.web.metrics import render
from worker.web.state import OAuthStates, StateError, authorize_link, secret_key

log = logging.getLogger(__name__)

#: Most credentials the page lists; ``python -m worker list`` shows them all.
PAGE_LIMIT = 200
#: Endpoints that answer without WEB_BASIC_AUTH.
OPEN_ENDPOINTS = frozenset({"callback", "healthz", "static"})
#: Endpoints that answer whatever the request's Host.
ANY_HOST_ENDPOINTS = frozenset({"healthz"})
#: OAuth 2.0's error codes (RFC 6749, 4.1.2.1): the only text of Miro's redirect a page shows.
OAUTH_ERRORS = frozenset(
    {
        "invalid_request",
        "unauthorized_client",
        "access_denied",
        "unsupported_response_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
    }
)
_NONCE = "oauth_nonce"
_CSRF = "csrf"
_HEADERS = {
    # The callback's URL holds a code and a state: no page may pass it on or be cached.
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
}


class PageError(Exception):
    """A request that cannot be served; shown as a page with its status."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title


def create_app(vault: Vault, address: str = "127.0.0.1") -> Flask:
    """The Flask app over one vault (one per process, shared by the server's threads).

    Args:
        vault: the process's vault.
        address: the address the server listens on, one of the hosts the app answers to.

    Raises:
        SettingsError: the Miro app is not configured (the page's whole point is connecting).
    """
    settings = vault.settings
    settings.require_miro_app()
    assert settings.miro_redirect_uri is not None
    key = secret_key(settings)
    app = Flask(__name__)
    app.secret_key = key
    app.config.update(
        SESSION_COOKIE_NAME="mtk_session",
        SESSION_COOKIE_HTTPONLY=True,
        # Lax: the cookie comes back on Miro's top-level redirect, not on cross-site POSTs.
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.miro_redirect_uri.startswith("https:"),
    )
    app.jinja_env.filters["when"] = when
    pages = _Pages(vault, OAuthStates(vault.redis, key))
    redirect_host = urlsplit(settings.miro_redirect_uri).hostname or ""
    hosts = HostAllowlist.serving(address, (redirect_host, *(settings.web_allowed_hosts or ())))
    app.before_request(_HostCheck(hosts))  # first: a foreign host gets no other answer
    app.before_request(_LoginCheck(settings.web_basic_auth))
    app.after_request(_secure_headers)
    app.register_error_handler(PageError, _error_page)
    app.register_error_handler(redis.RedisError, _redis_down)
    app.add_url_rule("/", "index", pages.index)
    app.add_url_rule("/connect", "connect", pages.connect)
    app.add_url_rule(urlsplit(settings.miro_redirect_uri).path or "/", "callback", pages.callback)
    app.add_url_rule("/disconnect", "disconnect", pages.disconnect, methods=["POST"])
    app.add_url_rule("/healthz", "healthz", pages.healthz)
    app.add_url_rule("/metrics", "metrics", pages.metrics)
    return app


class _Pages:
    """The views, bound to the vault and the state issuer."""

    def __init__(self, vault: Vault, states: OAuthStates) -> None:
        self.vault = vault
        self.states = states

    def index(self) -> str:
        ids = sorted(islice(self.vault.store.ids(), PAGE_LIMIT))
        total = sum(int(count) for count in self.vault.redis.hvals(STATE_COUNTS))
        csrf = session.setdefault(_CSRF, secrets.token_urlsafe(24))
        rows = list(self.vault.store.describe(ids))
        return render_template("index.html", rows=rows, total=total, csrf=csrf)

    def connect(self) -> Response:
        try:
            url, issued = authorize_link(
                self.vault.client,
                self.states,
                browser=True,
                team_id=request.args.get("team_id", "").strip() or None,
            )
        except InvalidCredentialId:
            raise PageError(
                400, "Not a team id", "A team_id is 1 to 64 letters, digits, _ or -, or empty."
            ) from None
        session[_NONCE] = issued.nonce
        return redirect(url)

    def callback(self) -> str:
        """Step 2 of Miro's guide. Every refusal happens before anything is stored.

        The state is checked first: until then the query is anyone's writing, and even after,
        only fixed words are shown for Miro's error.
        """
        args = request.args
        try:
            self.states.consume(args.get("state"), session.get(_NONCE))
        except StateError as error:
            raise PageError(error.status, "This connect link cannot be used", str(error)) from None
        if args.get("error") is not None:
            raise _refused_by_miro(args["error"])
        code = args.get("code")
        if not code:
            raise PageError(400, "No code", "Miro's redirect carries no code. Connect again.")
        credential = self._exchange(code)
        log.warning("credential %s connected through the web page", credential["id"])
        return render_template("connected.html", credential=credential)

    def _exchange(self, code: str) -> dict[str, object]:
        try:
            return self.vault.exchange(code).public()
        except GrantKept as error:
            raise PageError(202, "Connected: completing", str(error)) from None
        except miro.Refused:
            raise PageError(
                400,
                "Miro refused the code",
                "The code was used already or has expired (a code lives 10 minutes). "
                "Connect again. If Miro refuses again, its refusal may be of the app's "
                "credentials: ask the operator to run `python -m worker doctor`.",
            ) from None
        except (miro.MiroError, VaultError) as error:
            raise PageError(502, "Miro could not complete the connection", str(error)) from None

    def disconnect(self) -> str:
        expected = session.get(_CSRF, "").encode()
        given = request.form.get("csrf", "").encode()
        if not (expected and hmac.compare_digest(given, expected)):
            raise PageError(400, "Not sent from the page", "Reload the page and try again.")
        try:
            credential_id = CredentialId.parse(request.form.get("id", ""))
        except InvalidCredentialId as error:
            raise PageError(400, "Not a credential id", str(error)) from None
        known = self._revoke(credential_id)
        outcome = "Miro revoked the grant" if known else "Miro no longer knew its token"
        message = f"{outcome}; the credential is deleted."
        return render_template(
            "message.html", title=f"Disconnected {credential_id}", message=message
        )

    def _revoke(self, credential_id: CredentialId) -> bool:
        try:
            return self.vault.revoke(credential_id)
        except NotFoundError as error:
            raise PageError(404, "No such credential", str(error)) from None
        except NotRevoked as error:
            raise PageError(
                502, "Miro did not revoke the grant", f"{error}. The credential is kept."
            ) from None
        except VaultError as error:
            raise PageError(409, "Busy", str(error)) from None
        except miro.MiroError as error:
            raise PageError(
                502,
                "Miro could not be asked to revoke",
                f"{error}. The credential is kept, so nothing is lost: try again later.",
            ) from None

    def healthz(self) -> tuple[dict[str, Any], int]:
        try:
            self.vault.redis.ping()
            paused = self.vault.rotator.guard.paused()
        except redis.RedisError:
            return {"ok": False, "redis": "unreachable", "paused": None}, 503
        return {"ok": not paused, "redis": "ok", "paused": paused}, 503 if paused else 200

    def metrics(self) -> Response:
        return Response(render(read_status(self.vault)), content_type=CONTENT_TYPE_LATEST)


def _refused_by_miro(error: str) -> PageError:
    """The page for Miro's redirect carrying ``error``: fixed words, and the code if it is one."""
    if error == "access_denied":
        return PageError(
            403,
            "Not connected",
            "You declined the access on Miro's page, so nothing was connected. "
            "Connect again to allow it.",
        )
    code = f" ({error})" if error in OAUTH_ERRORS else ""
    return PageError(
        400,
        "Miro did not connect",
        f"Miro answered with an error{code}, so nothing was connected. Connect again; "
        "if it happens again, tell the operator.",
    )


class _HostCheck:
    """``before_request``: refuse a request for a host this app does not serve."""

    def __init__(self, hosts: HostAllowlist) -> None:
        self.hosts = hosts

    def __call__(self) -> Response | None:
        if request.endpoint in ANY_HOST_ENDPOINTS or self.hosts.allows(request.host):
            return None
        return Response(
            "This server does not answer to this host name; an operator can add it to "
            "WEB_ALLOWED_HOSTS.\n",
            400,
            content_type="text/plain; charset=utf-8",
        )


class _LoginCheck:
    """``before_request``: ask for WEB_BASIC_AUTH on every endpoint not in OPEN_ENDPOINTS."""

    def __init__(self, login: str | None) -> None:
        self.login = login.encode() if login else None

    def __call__(self) -> Response | None:
        if self.login is None or request.endpoint in OPEN_ENDPOINTS:
            return None
        given = request.authorization
        if given and given.type == "basic":
            presented = f"{given.username or ''}:{given.password or ''}".encode()
            if hmac.compare_digest(presented, self.login):
                return None
        return Response(
            "Log in with WEB_BASIC_AUTH.\n",
            401,
            {"WWW-Authenticate": 'Basic realm="Miro token keeper", charset="UTF-8"'},
        )


def _secure_headers(response: Response) -> Response:
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _error_page(error: PageError) -> tuple[str, int]:
    page = render_template("message.html", title=error.title, message=str(error))
    return page, error.status


def _redis_down(error: redis.RedisError) -> tuple[str, int]:
    log.error("Redis is unreachable: %s", error)
    message = "Redis cannot be reached; nothing was changed. Try again in a moment."
    return render_template("message.html", title="Unavailable", message=message), 503


def when(epoch: float | None, now: float | None = None) -> str:
    """An expiry for people: the UTC time and how far away it is."""
    if epoch is None:
        return "never"
    seconds = epoch - (time.time() if now is None else now)
    moment = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")
    minutes = abs(seconds) / 60
    if minutes < 120:
        span = f"{minutes:.0f} min"
    elif minutes < 48 * 60:
        span = f"{minutes / 60:.0f} h"
    else:
        span = f"{minutes / 1440:.0f} days"
    return f"{moment} ({'in ' + span if seconds >= 0 else span + ' ago'})"
