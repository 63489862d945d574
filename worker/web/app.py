"""The web app: the operator's console, the OAuth callback, health and metrics.

=========================  =======================================================  ========
route                      what                                                     login
=========================  =======================================================  ========
``GET /``                  the console: counts, soonest expiries, credentials       yes
                           paged by view (``view``), searched by id (``q``)
``GET /api/credentials``   the console's figures and rows as JSON                   yes
``GET /connect``           redirect to Miro's authorize page with a new state       yes
``GET <callback path>``    the path of MIRO_REDIRECT_URI: check, exchange, store    no
``POST /rotate``           queue a forced rotation for the workers                  yes
``POST /disconnect``       revoke at Miro and delete (``Vault.revoke``)             yes
``GET /healthz``           Redis reachable and refreshing not paused                no
``GET /metrics``           Prometheus text format                                   yes
``GET /static/...``        the console's stylesheet and script                      no
=========================  =======================================================  ========

Served by :mod:`worker.web.serving`: one process, a pool of threads.

"login" is ``WEB_BASIC_AUTH`` when set. The callback cannot ask for it: the users an operator
sends a ``connect-url`` link to have no login; the state protects it instead (see
:mod:`worker.web.state`). No page ever shows a token, nor text that a link can put in it.
The two actions take the page's CSRF token; asked for JSON (the console's script), they
answer JSON, else they send the browser back to the console with a notice.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import (
    Flask,
    Response,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from kombu.exceptions import OperationalError as BrokerUnreachable
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.wrappers.response import Response as BaseResponse

from worker import miro
from worker.credential import CredentialId, InvalidCredentialId
from worker.forced import queue_rotation
from worker.hosts import HostAllowlist
from worker.idindex import is_complete
from worker.listing import CursorError, Listing, Page, View
from worker.redis_errors import describe
from worker.status import Status, read_status
from worker.store import NotFoundError
from worker.vault import GrantKept, NotRevoked, Vault, VaultError
from worker.web.metrics import render
from worker.web.state import OAuthStates, StateError, authorize_link, secret_key

log = logging.getLogger(__name__)

#: Endpoints that answer without WEB_BASIC_AUTH.
OPEN_ENDPOINTS = frozenset({"callback", "healthz", "static"})
#: Endpoints that answer whatever the request's Host.
ANY_HOST_ENDPOINTS = frozenset({"healthz"})
#: Seconds between two refreshes of the console by its script.
REFRESH_SECONDS = 5
#: The figures of ``python -m worker status`` the console shows (in ``/api/credentials``'s
#: ``summary``); the journal's is the web process's own, not the workers'.
SUMMARY_FIGURES = (
    "credentials",
    "by_state",
    "overdue",
    "soonest_access_expiry_in",
    "soonest_refresh_expiry_in",
    "paused",
)
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
    # Scripts and styles from the app's own files only: nothing written into a page runs.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'",
}


class PageError(Exception):
    """A request that cannot be served; shown as a page (or JSON) with its status."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title


@dataclass(frozen=True)
class ConsoleQuery:
    """What the console shows: a view, or a search, from a cursor on."""

    view: View = View.DUE
    search: str = ""
    cursor: str = ""

    @classmethod
    def from_request(cls, values: Any) -> ConsoleQuery:
        """The query in a request's arguments (or an action's form, to return to it).

        Raises:
            PageError: the view is not one the console has.
        """
        try:
            view = View(values.get("view") or View.DUE)
        except ValueError:
            names = ", ".join(View)
            raise PageError(400, "No such view", f"A view is one of: {names}.") from None
        return cls(view, values.get("q", "").strip(), values.get("cursor", ""))

    def arguments(self, **changes: str) -> dict[str, Any]:
        """The query string of this query, with ``changes``; defaults left out."""
        view = "" if self.view is View.DUE else self.view.value
        values = {"view": view, "q": self.search, "cursor": self.cursor, **changes}
        return {name: value for name, value in values.items() if value}


@dataclass(frozen=True)
class Console:
    """What the console shows at one moment: the figures, and one page of credentials."""

    status: Status
    page: Page
    #: Whether search and "All" can miss credentials stored before the id index.
    index_complete: bool
    generated_at: float

    def as_json(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at,
            "index_complete": self.index_complete,
            "summary": {name: getattr(self.status, name) for name in SUMMARY_FIGURES},
            "rows": self.page.rows,
            "next": self.page.next,
        }


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
    app.jinja_env.filters["utc"] = utc
    app.jinja_env.filters["iso"] = iso
    pages = _Pages(vault, OAuthStates(vault.redis, key))
    redirect_host = urlsplit(settings.miro_redirect_uri).hostname or ""
    hosts = HostAllowlist.serving(address, (redirect_host, *(settings.web_allowed_hosts or ())))
    app.before_request(_start_clock)
    app.before_request(_HostCheck(hosts))  # a foreign host gets no other answer
    app.before_request(_LoginCheck(settings.web_basic_auth))
    app.after_request(_secure_headers)
    app.register_error_handler(PageError, _error_page)
    app.register_error_handler(redis.RedisError, _redis_down)
    app.register_error_handler(BrokerUnreachable, _redis_down)
    app.add_url_rule("/", "index", pages.index)
    app.add_url_rule("/api/credentials", "credentials", pages.credentials)
    app.add_url_rule("/connect", "connect", pages.connect)
    app.add_url_rule(urlsplit(settings.miro_redirect_uri).path or "/", "callback", pages.callback)
    app.add_url_rule("/rotate", "rotate", pages.rotate, methods=["POST"])
    app.add_url_rule("/disconnect", "disconnect", pages.disconnect, methods=["POST"])
    app.add_url_rule("/healthz", "healthz", pages.healthz)
    app.add_url_rule("/metrics", "metrics", pages.metrics)
    return app


class _Pages:
    """The views, bound to the vault, its listing and the state issuer."""

    def __init__(self, vault: Vault, states: OAuthStates) -> None:
        self.vault = vault
        self.listing = Listing(vault.store)
        self.states = states

    def index(self) -> str:
        query = ConsoleQuery.from_request(request.args)
        csrf = session.setdefault(_CSRF, secrets.token_urlsafe(24))
        return render_template(
            "index.html",
            query=query,
            csrf=csrf,
            refresh_seconds=REFRESH_SECONDS,
            **vars(self._console(query)),
        )

    def credentials(self) -> dict[str, Any]:
        return self._console(ConsoleQuery.from_request(request.args)).as_json()

    def _console(self, query: ConsoleQuery) -> Console:
        return Console(
            status=read_status(self.vault),
            page=self._page(query),
            index_complete=is_complete(self.vault.redis),
            generated_at=time.time(),
        )

    def _page(self, query: ConsoleQuery) -> Page:
        try:
            if query.search:
                return self.listing.search(query.search, query.cursor)
            return self.listing.page(query.view, query.cursor)
        except InvalidCredentialId:
            raise PageError(
                400,
                "Not an id",
                "Search by a team id, a user id or <team_id>:<user_id>: each 1 to 64 letters, "
                "digits, _ or -.",
            ) from None
        except CursorError as error:
            raise PageError(400, "Out-of-date link", str(error)) from None

    def connect(self) -> BaseResponse:
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

    def rotate(self) -> BaseResponse | tuple[dict[str, str], int]:
        """Queue a forced rotation: the workers call Miro, this request does not wait for it.

        The version the page showed goes with it: a rotation committed since that page was
        drawn already replaced the pair it showed, and satisfies the request.
        """
        credential_id = _checked_action()
        seen = request.form.get("version", "")
        if not seen.isdigit():
            raise PageError(400, "No version", "Reload the page and try again.")
        if self.vault.rotator.version_now(credential_id) is None:
            raise PageError(404, "No such credential", str(NotFoundError(credential_id)))
        queue_rotation(credential_id, int(seen))
        return _done(
            f"Rotation of {credential_id} queued: its row shows the new version once a worker "
            "has rotated it."
        )

    def disconnect(self) -> BaseResponse | tuple[dict[str, str], int]:
        credential_id = _checked_action()
        known = self._revoke(credential_id)
        outcome = "Miro revoked the grant" if known else "Miro no longer knew its token"
        return _done(f"Disconnected {credential_id}: {outcome}; the credential is deleted.")

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


def _checked_action() -> CredentialId:
    """The credential an action's form names, once its CSRF token is the session's.

    Raises:
        PageError: the form was not sent from the console, or names no credential.
    """
    expected = session.get(_CSRF, "").encode()
    given = request.form.get("csrf", "").encode()
    if not (expected and hmac.compare_digest(given, expected)):
        raise PageError(400, "Not sent from the page", "Reload the page and try again.")
    try:
        return CredentialId.parse(request.form.get("id", ""))
    except InvalidCredentialId as error:
        raise PageError(400, "Not a credential id", str(error)) from None


def _wants_json() -> bool:
    """Whether the request is the console's script's (or any API client's)."""
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return request.path.startswith("/api/") or best == "application/json"


def _done(message: str) -> BaseResponse | tuple[dict[str, str], int]:
    """An action's success: JSON for the script, else back to the console with a notice."""
    if _wants_json():
        return {"message": message}, 200
    flash(message)
    try:
        back = ConsoleQuery.from_request(request.form)
    except PageError:  # the action is done: a view the form should not name is no reason to fail
        back = ConsoleQuery()
    return redirect(url_for("index", **back.arguments()), code=303)


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


def _start_clock() -> None:
    g.started = time.perf_counter()


def _secure_headers(response: Response) -> Response:
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)
    if "started" in g:  # the server's time, for the browser's developer tools and the bench
        elapsed_ms = (time.perf_counter() - g.started) * 1000
        response.headers["Server-Timing"] = f"app;dur={elapsed_ms:.1f}"
    return response


def _error_page(error: PageError) -> tuple[Any, int]:
    if _wants_json():
        return {"error": str(error), "title": error.title}, error.status
    page = render_template("message.html", title=error.title, message=str(error))
    return page, error.status


def _redis_down(error: Exception) -> tuple[Any, int]:
    kind = describe(error) if isinstance(error, redis.RedisError) else type(error).__name__
    log.error("Redis is unreachable: %s", kind)
    message = "Redis cannot be reached; nothing was changed. Try again in a moment."
    return _error_page(PageError(503, "Unavailable", message))


def utc(epoch: float | None) -> str:
    """A time for a page without its script: UTC, to the minute (the script shows local time)."""
    if epoch is None:
        return "never"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


def iso(epoch: float) -> str:
    """A ``<time datetime>`` value."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
