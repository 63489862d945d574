"""The Miro client: failure classification, answer checking, and real calls over HTTP."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import urllib3
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict

from settings import Settings
from tests.conftest import CLIENT_ID, REDIRECT_URI, free_port
from worker.miro import (
    DEFAULT_ACCESS_LIFETIME,
    DEFAULT_RATE_LIMIT_WAIT,
    ERROR_CODE_CHARS,
    ERROR_MESSAGE_CHARS,
    MAX_ACCESS_LIFETIME,
    MAX_BODY_BYTES,
    MiroClient,
    MiroError,
    RateLimited,
    Refused,
    Said,
    TokenGrant,
    Transient,
    _route,
    classify,
    parse_token_response,
    what_miro_said,
)
from worker.sandbox import DIALECTS, Sandbox, SandboxConfig
from worker.secret import Secret

NOW = 1_700_000_000.0
BIG_TEAM_ID = 3074457358607431473  # > 2^53: a float would round it


def _token() -> Secret:
    return Secret(secrets.token_urlsafe(30))


def _miro_body(status: int, code: str, message: str) -> str:
    return json.dumps({"status": status, "code": code, "message": message, "type": "error"})


# classify


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (401, _miro_body(401, "unauthorized", "Client authentication failed"), Refused),
        (400, _miro_body(400, "invalidGrant", "Invalid refresh token"), Refused),
        (401, _miro_body(401, "oauthError", "Unauthorized"), Refused),
        (401, json.dumps({"error": "invalid_client", "error_description": "bad"}), Refused),
        (400, json.dumps({"error": "invalid_grant", "error_description": "gone"}), Refused),
        (403, "", Refused),
        (404, _miro_body(404, "notFound", "Access token not found"), Refused),
        (408, "", Transient),
        (500, _miro_body(500, "internalError", "Internal server error"), Transient),
        (502, "<html>502 Bad Gateway</html>", Transient),
        (503, "", Transient),
    ],
)
def test_classify_goes_by_the_status_alone(status: int, body: str, kind: type[MiroError]) -> None:
    error = classify(status, what_miro_said(body.encode()), CaseInsensitiveDict(), now=NOW)
    assert type(error) is kind
    assert error.status == status and "<html>" not in str(error)


@pytest.mark.parametrize(
    "words",
    ["invalid_client: Client authentication failed", "invalid_grant: Invalid refresh token"],
)
def test_a_refusal_names_no_culprit_but_keeps_miros_words(words: str) -> None:
    code, message = words.split(": ")
    said = what_miro_said(json.dumps({"error": code, "error_description": message}).encode())
    error = classify(401, said, {}, now=NOW)
    assert type(error) is Refused and str(error) == f"HTTP 401: Miro refused the call ({words})"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-RateLimit-Reset": str(int(NOW) + 30), "Retry-After": "5"}, NOW + 30),
        ({"X-RateLimit-Reset": str(int(NOW) - 30)}, NOW),
        ({"Retry-After": "7"}, NOW + 7),
        ({"Retry-After": formatdate(NOW + 120, usegmt=True)}, NOW + 120),
        ({"Retry-After": "soon"}, NOW + DEFAULT_RATE_LIMIT_WAIT),
        ({"X-RateLimit-Reset": "later"}, NOW + DEFAULT_RATE_LIMIT_WAIT),
        ({}, NOW + DEFAULT_RATE_LIMIT_WAIT),
    ],
)
def test_a_429_says_when_to_retry(headers: dict[str, str], expected: float) -> None:
    said = what_miro_said(_miro_body(429, "tooManyRequests", "Request rate limit exceed").encode())
    error = classify(429, said, CaseInsensitiveDict(headers), now=NOW)
    assert isinstance(error, RateLimited)
    assert error.retry_at == pytest.approx(expected)


# parse_token_response


def _answer(**fields: Any) -> dict[str, Any]:
    """An exchange answer as in Miro's guide; a field given as ``...`` is left out."""
    body: dict[str, Any] = {
        "user_id": "9876543210123456789",
        "refresh_token": secrets.token_urlsafe(30),
        "access_token": secrets.token_urlsafe(30),
        "expires_in": 3599,
        "team_id": "1234567890987654321",
        "scope": "boards:write boards:read",
        "token_type": "bearer",
    }
    body.update(fields)
    return {name: value for name, value in body.items() if value is not ...}


def test_an_exchange_answer_is_parsed_field_by_field() -> None:
    body = _answer()
    grant = parse_token_response(json.loads(json.dumps(body)))
    assert grant == TokenGrant(
        Secret(body["access_token"]),
        Secret(body["refresh_token"]),
        3599,
        "1234567890987654321",
        "9876543210123456789",
        "boards:write boards:read",
        "bearer",
    )


@pytest.mark.parametrize(
    "expires_in", [10**12, MAX_ACCESS_LIFETIME + 1, -5, 0, "3599", True, 3599.0, ...]
)
def test_an_unusable_expires_in_becomes_the_default_with_a_warning(expires_in: Any) -> None:
    grant = parse_token_response(_answer(expires_in=expires_in))
    assert grant.expires_in == DEFAULT_ACCESS_LIFETIME
    assert grant.warning is not None and "expires_in" in grant.warning


def test_no_refresh_token_and_no_expires_in_is_a_non_expiring_grant() -> None:
    grant = parse_token_response(_answer(refresh_token=..., expires_in=...))
    assert grant.refresh_token is None and grant.expires_in is None
    assert grant.warning is None


def test_a_bare_team_id_above_2_53_stays_exact() -> None:
    text = f'{{"access_token":"a","refresh_token":"r","expires_in":3599,"team_id":{BIG_TEAM_ID}}}'
    grant = parse_token_response(json.loads(text))
    assert grant.team_id == str(BIG_TEAM_ID)
    assert grant.user_id is None and grant.warning is None


def test_a_float_team_id_is_ignored_with_a_warning() -> None:
    grant = parse_token_response(_answer(team_id=float(BIG_TEAM_ID), user_id=True))
    assert grant.team_id is None and grant.user_id is None
    assert grant.warning is not None
    assert "team_id is a float" in grant.warning and "user_id is a bool" in grant.warning


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "token",
        42,
        {},
        {"access_token": ""},
        {"access_token": 12345},
        {"error": "invalid_grant"},
    ],
)
def test_an_answer_without_an_access_token_string_is_transient(body: Any) -> None:
    with pytest.raises(Transient):
        parse_token_response(body)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
_TOKEN_FIELDS = st.sampled_from(
    ["access_token", "refresh_token", "expires_in", "team_id", "user_id", "scope", "token_type"]
)


@hypothesis_settings(max_examples=150, database=None, deadline=None)
@given(_JSON | st.dictionaries(_TOKEN_FIELDS | st.text(max_size=6), _JSON, max_size=8))
def test_any_json_answer_gives_a_grant_or_transient_and_never_loses_the_token(body: Any) -> None:
    access = body.get("access_token") if isinstance(body, dict) else None
    usable = isinstance(access, str) and access != ""
    try:
        grant = parse_token_response(body)
    except Transient:
        assert not usable
        return
    assert usable and grant.access_token == Secret(access)
    assert grant.expires_in is None or 0 < grant.expires_in <= MAX_ACCESS_LIFETIME
    assert grant.team_id is None or isinstance(grant.team_id, str)
    assert isinstance(grant.scope, str) and isinstance(grant.token_type, str)


# Against the sandbox


def _code(client: MiroClient, team_id: str | None = None) -> str:
    response = requests.get(
        client.authorize_url(state="s", team_id=team_id), allow_redirects=False, timeout=5
    )
    assert response.status_code == 302, response.text
    return parse_qs(urlsplit(response.headers["Location"]).query)["code"][0]


@pytest.fixture
def client(settings: Settings) -> MiroClient:
    return MiroClient(settings)


def _client(env: dict[str, str], **changes: str) -> MiroClient:
    return MiroClient(Settings.from_env({**env, **changes}))


def test_authorize_url_carries_the_guide_parameters(client: MiroClient, sandbox: Sandbox) -> None:
    url = urlsplit(client.authorize_url(state="xyz", team_id=str(BIG_TEAM_ID)))
    assert f"{url.scheme}://{url.netloc}" == sandbox.url
    assert url.path == "/oauth/authorize"
    assert parse_qs(url.query) == {
        "response_type": ["code"],
        "client_id": [CLIENT_ID],
        "redirect_uri": [REDIRECT_URI],
        "state": ["xyz"],
        "team_id": [str(BIG_TEAM_ID)],
    }
    assert "team_id" not in parse_qs(urlsplit(client.authorize_url(state="xyz")).query)


def test_exchange_returns_the_grant_the_sandbox_issued(
    client: MiroClient, sandbox: Sandbox
) -> None:
    grant = client.exchange_code(_code(client, team_id=str(BIG_TEAM_ID)))

    assert grant.team_id == str(BIG_TEAM_ID) and grant.user_id is not None
    issued = sandbox.grant(grant.team_id, grant.user_id)
    assert issued is not None
    assert grant.access_token == Secret(issued["access_token"])
    assert grant.refresh_token == Secret(issued["refresh_token"])
    assert grant.expires_in == 3599 and grant.token_type == "bearer" and grant.warning is None


def test_a_code_is_single_use(client: MiroClient) -> None:
    code = _code(client)
    client.exchange_code(code)
    with pytest.raises(Refused):
        client.exchange_code(code)


def test_refresh_rotates_the_pair_and_the_old_refresh_token_dies(
    client: MiroClient, sandbox: Sandbox
) -> None:
    first = client.exchange_code(_code(client, team_id=str(BIG_TEAM_ID)))
    assert first.refresh_token is not None

    second = client.refresh(first.refresh_token)

    assert second.team_id == str(BIG_TEAM_ID) and second.user_id is None
    assert second.access_token != first.access_token
    assert second.refresh_token not in (None, first.refresh_token)
    assert sandbox.stats()["refreshes"] == 1
    with pytest.raises(Refused):
        client.refresh(first.refresh_token)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_dead_refresh_token_and_a_wrong_secret_are_both_refusals_in_every_dialect(
    env: dict[str, str], dialect: Any
) -> None:
    secret = env["MIRO_CLIENT_SECRET"]
    with Sandbox(SandboxConfig(CLIENT_ID, secret, dialect=dialect)) as other:
        client = _client(env, MIRO_API_URL=other.url, MIRO_AUTH_URL=other.url)
        with pytest.raises(Refused):
            client.refresh(_token())
        wrong = _client(env, MIRO_API_URL=other.url, MIRO_CLIENT_SECRET="x" + secret)
        with pytest.raises(Refused):
            wrong.refresh(_token())


def test_a_429_from_miro_is_rate_limited_until_its_reset(
    client: MiroClient, sandbox: Sandbox
) -> None:
    sandbox.set_faults(rate_limit_rate=1.0, rate_limit_reset_s=30)
    with pytest.raises(RateLimited) as error:
        client.refresh(_token())
    assert error.value.retry_at == pytest.approx(time.time() + 30, abs=3)


def test_token_info_names_the_user_and_team(client: MiroClient) -> None:
    grant = client.exchange_code(_code(client, team_id="77"))
    info = client.token_info(grant.access_token)
    assert info["user"]["id"] == grant.user_id
    assert info["team"]["id"] == "77"


def test_whose_names_the_team_and_user_of_a_token(client: MiroClient) -> None:
    grant = client.exchange_code(_code(client, team_id="77"))
    assert client.whose(grant.access_token) == ("77", grant.user_id)
    with pytest.raises(Refused):
        client.whose(_token())


@pytest.mark.parametrize(
    "info", [{}, {"team": {"id": 7}}, {"team": {"id": 7}, "user": {"id": ""}}, {"user": 8}]
)
def test_whose_of_a_token_info_without_ids_is_transient(
    env: dict[str, str], info: dict[str, Any]
) -> None:
    with _canned(200, json.dumps(info).encode()) as server, pytest.raises(Transient):
        _client(env, MIRO_API_URL=server.url).whose(_token())


def test_revoke_ends_the_grant_and_a_second_revoke_is_refused(
    client: MiroClient, sandbox: Sandbox
) -> None:
    grant = client.exchange_code(_code(client))
    assert grant.refresh_token is not None

    client.revoke(grant.access_token)

    assert sandbox.stats()["revokes"] == 1
    with pytest.raises(Refused):
        client.revoke(grant.access_token)
    with pytest.raises(Refused):
        client.refresh(grant.refresh_token)


def test_a_hung_call_times_out_as_transient(env: dict[str, str], sandbox: Sandbox) -> None:
    sandbox.set_faults(hang_rate=1.0, hang_s=30)
    client = _client(env, HTTP_TIMEOUT="0.3")
    with pytest.raises(Transient, match=r"did not answer .* within 0\.3 s"):
        client.refresh(_token())
    assert sandbox.stats()["hung"] == 1


def test_an_unreachable_miro_is_transient(env: dict[str, str]) -> None:
    client = _client(env, MIRO_API_URL=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Transient, match="cannot reach Miro"):
        client.refresh(_token())


# Against a tiny real HTTP server with canned answers


class _Handler(BaseHTTPRequestHandler):
    server: _CannedServer
    protocol_version = "HTTP/1.1"  # connections are kept alive, as Miro's are
    disable_nagle_algorithm = True  # or a kept-alive call can wait 40 ms for a delayed ACK

    def setup(self) -> None:
        super().setup()
        self.server.connections.append(self.client_address)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_CONNECT(self) -> None:  # a proxy asked to open a tunnel
        self._answer()

    def _answer(self) -> None:
        received = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(self.path)
        self.server.proxy_logins.append(self.headers.get("Proxy-Authorization"))
        if self.server.status is None:  # hang up without answering
            self.close_connection = True
            return
        body = self.server.body
        if self.server.echo:  # Miro's error shape, quoting everything the call carried
            sent = f"{received.decode()} {self.headers.get('Authorization', '')}"
            body = _miro_body(self.server.status, "refused", f"{body.decode()}: {sent}").encode()
        self.send_response(self.server.status)
        for name, value in self.server.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _CannedServer(ThreadingHTTPServer):
    """Gives every request the same answer, and notes each request and connection."""

    daemon_threads = True

    def __init__(
        self, status: int | None, body: bytes, echo: bool, headers: dict[str, str]
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.status, self.body, self.echo, self.headers = status, body, echo, headers
        self.requests: list[str] = []
        self.proxy_logins: list[str | None] = []
        self.connections: list[tuple[str, int]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def _canned(
    status: int | None,
    body: bytes = b"",
    *,
    echo: bool = False,
    headers: dict[str, str] | None = None,
) -> Iterator[_CannedServer]:
    """A server answering ``status`` and ``body``; a ``status`` of None hangs up instead."""
    server = _CannedServer(status, body, echo, headers or {})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_an_answer_over_64_kib_is_transient(env: dict[str, str]) -> None:
    body = json.dumps({"access_token": "a", "padding": "x" * 70_000}).encode()
    with _canned(200, body) as server, pytest.raises(Transient, match="exceeds 65536 bytes"):
        _client(env, MIRO_API_URL=server.url).refresh(_token())


def test_a_huge_error_body_is_not_kept_but_still_classified(env: dict[str, str]) -> None:
    with _canned(401, b"x" * 70_000) as server, pytest.raises(Refused) as error:
        _client(env, MIRO_API_URL=server.url).refresh(_token())
    assert "exceeds 65536 bytes" in error.value.reason and "xxx" not in str(error.value)


@pytest.mark.parametrize(
    "body", [b"<html>OK</html>", b"\xff\xfe\xfa", b"", b'["a list"]', b'{"access_token": null}']
)
def test_a_2xx_without_a_usable_json_grant_is_transient_and_not_echoed(
    env: dict[str, str], body: bytes
) -> None:
    with _canned(200, body) as server, pytest.raises(Transient) as error:
        _client(env, MIRO_API_URL=server.url).refresh(_token())
    assert "<html>" not in str(error.value)


@pytest.mark.parametrize("body", [b"[" * 50_000, b'{"expires_in": 1' + b"0" * 5000 + b"}"])
def test_a_pathological_2xx_body_is_transient(env: dict[str, str], body: bytes) -> None:
    with _canned(200, body) as server, pytest.raises(Transient):
        _client(env, MIRO_API_URL=server.url).refresh(_token())


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_transient_and_not_followed(env: dict[str, str], status: int) -> None:
    grant = json.dumps(_answer()).encode()  # the status decides, not a usable-looking body
    with _canned(200, grant) as elsewhere:
        location = {"Location": f"{elsewhere.url}/v1/oauth/token"}
        with _canned(status, grant, headers=location) as miro:
            client = _client(env, MIRO_API_URL=miro.url)
            for call in (lambda: client.refresh(_token()), lambda: client.revoke(_token())):
                with pytest.raises(Transient, match="with a redirect, not followed"):
                    call()
    assert miro.requests == ["/v1/oauth/token", "/v2/oauth/revoke"]
    assert elsewhere.requests == []


def test_a_dropped_connection_is_transient_and_not_retried(env: dict[str, str]) -> None:
    with _canned(None) as miro:
        client = _client(env, MIRO_API_URL=miro.url)
        with pytest.raises(Transient, match="cannot reach Miro at /v1/oauth/token"):
            client.refresh(_token())
        with pytest.raises(Transient, match="cannot reach Miro at /v1/oauth-token"):
            client.token_info(_token())  # a GET, which urllib3 would retry by default
    assert miro.requests == ["/v1/oauth/token", "/v1/oauth-token"]


@pytest.mark.parametrize(
    ("status", "body"),
    [(200, json.dumps(_answer()).encode()), (400, b'{"error": "invalid_grant"}')],
)
def test_calls_in_a_row_share_one_kept_alive_connection(
    env: dict[str, str], status: int, body: bytes
) -> None:
    with _canned(status, body) as miro:
        client = _client(env, MIRO_API_URL=miro.url)
        calls = [
            *[lambda: client.refresh(_token())] * 3,
            lambda: client.token_info(_token()),
            lambda: client.revoke(_token()),
            lambda: client.exchange_code("code"),
        ]
        for call in calls:
            with pytest.raises(Refused) if status == 400 else nullcontext():
                call()
    assert len(miro.requests) == len(calls)
    assert len(miro.connections) == 1


def test_a_connection_whose_answer_was_left_unread_is_not_reused(env: dict[str, str]) -> None:
    with _canned(200, b"x" * 4 * MAX_BODY_BYTES) as miro:
        client = _client(env, MIRO_API_URL=miro.url)
        for _ in range(2):
            with pytest.raises(Transient, match="exceeds"):
                client.refresh(_token())
    assert len(miro.requests) == 2
    assert len(miro.connections) == 2


class _ShortHandler(BaseHTTPRequestHandler):
    """Answers a grant, then hangs up before the last bytes its Content-Length announced."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        grant = json.dumps(_answer()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(grant) + 100))
        self.end_headers()
        self.wfile.write(grant)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_an_answer_short_of_its_content_length_is_transient(env: dict[str, str]) -> None:
    """A body cut short is broken off even when what came reads as a grant.

    urllib3 2 checks the length by itself; the 1.26 of Miro's SDK only when asked.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ShortHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        client = _client(env, MIRO_API_URL=f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(Transient, match="broke off"):
            client.refresh(_token())
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("status", [400, 401, 429, 500])
def test_no_error_message_contains_a_token_or_the_client_secret(
    env: dict[str, str], status: int
) -> None:
    client_secret = secrets.token_urlsafe(24)
    refresh, access, code = (secrets.token_urlsafe(30) for _ in range(3))
    sent = (client_secret, refresh, access, code)
    with _canned(status, b"Miro says no", echo=True) as server:
        client = _client(env, MIRO_API_URL=server.url, MIRO_CLIENT_SECRET=client_secret)
        calls = [
            lambda: client.refresh(Secret(refresh)),
            lambda: client.exchange_code(code),
            lambda: client.revoke(Secret(access)),
            lambda: client.token_info(Secret(access)),
        ]
        errors: list[MiroError] = []
        for call in calls:
            with pytest.raises(MiroError) as caught:
                call()
            errors.append(caught.value)
    for error in errors:
        assert "Miro says no" in str(error)  # Miro's message is kept for the operator...
        for secret in sent:
            assert secret not in str(error) and secret not in error.reason  # ...scrubbed


def test_sandbox_refusals_do_not_repeat_what_was_sent(env: dict[str, str]) -> None:
    refresh = secrets.token_urlsafe(30)
    wrong_secret = secrets.token_urlsafe(24)
    with pytest.raises(Refused) as rejected:
        _client(env).refresh(Secret(refresh))
    with pytest.raises(Refused) as refused:
        _client(env, MIRO_CLIENT_SECRET=wrong_secret).refresh(Secret(refresh))
    for error in (rejected.value, refused.value):
        assert refresh not in str(error) and wrong_secret not in str(error)
        assert env["MIRO_CLIENT_SECRET"] not in str(error)


# What is kept of a refusal


def test_of_an_error_body_only_miros_code_and_message_are_kept() -> None:
    token = secrets.token_urlsafe(30)
    body = {
        "status": 400,
        "code": "invalidGrant",
        "message": "Invalid refresh token",
        "type": "error",
        "context": {"refresh_token": token, "trace": "at TokenService.refresh"},
    }
    said = what_miro_said(json.dumps(body).encode())
    assert said == Said(
        "invalidGrant", "Invalid refresh token", "invalidGrant: Invalid refresh token"
    )


def test_rfc_6749_s_error_and_description_are_kept_as_code_and_message() -> None:
    body = {"error": "invalid_client", "error_description": "Client authentication failed"}
    said = what_miro_said(json.dumps(body).encode())
    assert said.text == "invalid_client: Client authentication failed"


@pytest.mark.parametrize(
    "shape",
    [
        "<html><body>502 upstream said {token}</body></html>",
        "refresh_token={token}",
        '["{token}"]',
        '{{"code": 400, "message": ["{token}"]}}',
    ],
)
def test_a_body_without_miros_fields_keeps_no_text(shape: str) -> None:
    token = secrets.token_urlsafe(30)
    body = shape.format(token=token).encode()
    said = what_miro_said(body)
    assert str(len(body)) in said.text and "bytes" in said.text
    assert token not in said.text and token[:8] not in said.text
    assert said.code == said.message == ""


def test_the_calls_secrets_are_scrubbed_from_the_fields_however_json_spells_them() -> None:
    secret = f"pass word {secrets.token_hex(3)}"  # no token's shape: found by its value alone
    spelled = "".join(f"\\u{ord(c):04x}" for c in secret)
    body = f'{{"code": "refused", "message": "the secret \\"{spelled}\\" is wrong"}}'.encode()
    said = what_miro_said(body, [secret])
    assert said.message == 'the secret "***" is wrong'


def test_a_token_the_call_did_not_send_is_hidden_by_its_shape() -> None:
    other = secrets.token_urlsafe(45)
    message = f"Client authentication failed: invalid client id or secret; new token {other}"
    said = what_miro_said(_miro_body(401, "unauthorized", message).encode())
    assert other not in said.text and other[:12] not in said.text
    assert "Client authentication failed: invalid client id or secret; new token ***" in said.text


def test_the_kept_fields_are_short_and_single_line() -> None:
    body = _miro_body(400, "invalid\nGrant\x1b[31m" + "c" * 500, "line\r\nbreak " + "m" * 5000)
    said = what_miro_said(body.encode())
    assert len(said.code) <= ERROR_CODE_CHARS and len(said.message) <= ERROR_MESSAGE_CHARS
    assert said.message.startswith("line break mmm") and said.message.endswith("…")
    assert all(character.isprintable() for character in said.text)


def test_the_credentials_other_tokens_are_scrubbed_as_well(env: dict[str, str]) -> None:
    access = f"access {secrets.token_hex(4)}"  # no token's shape: found by its value alone
    refresh = f"refresh {secrets.token_hex(4)}"
    body = _miro_body(400, "invalidGrant", f"the grant of {access} and {refresh} is gone")
    with _canned(400, body.encode()) as server:
        client = _client(env, MIRO_API_URL=server.url)
        with pytest.raises(Refused) as refreshed:
            client.refresh(Secret(refresh), hide=[Secret(access)])
        with pytest.raises(Refused) as revoked:
            client.revoke(Secret(access), hide=[Secret(refresh), None])
    for error in (refreshed.value, revoked.value):
        assert "the grant of *** and *** is gone" in str(error)


def test_no_token_a_careless_miro_echoes_reaches_an_error(
    env: dict[str, str], sandbox: Sandbox
) -> None:
    """The sandbox quotes what each call carried and both tokens of the grant it names."""
    client = _client(env)
    wrong_secret = secrets.token_urlsafe(24)
    wrong = _client(env, MIRO_CLIENT_SECRET=wrong_secret)
    grant = client.exchange_code(_code(client))
    refresh = grant.refresh_token
    assert refresh is not None
    used_code = _code(client)
    client.exchange_code(used_code)
    sandbox.set_faults(echo_tokens=True)
    calls = [
        lambda: client.exchange_code(used_code),
        lambda: wrong.refresh(refresh, hide=[grant.access_token]),
        lambda: wrong.revoke(grant.access_token, hide=[grant.refresh_token]),
        lambda: client.token_info(Secret(used_code), hide=[grant.refresh_token]),
    ]
    errors: list[MiroError] = []
    for call in calls:
        with pytest.raises(MiroError) as caught:
            call()
        errors.append(caught.value)

    assert [type(error) for error in errors] == [Refused] * 4
    assert "Client authentication failed" in str(errors[1])  # Miro's message is kept
    texts = " ".join(f"{error} {error.reason}" for error in errors)
    assert "(tokens: ***" in texts  # the sandbox did echo
    for secret in sandbox.issued_tokens() | {env["MIRO_CLIENT_SECRET"], wrong_secret, used_code}:
        assert secret not in texts


@pytest.fixture
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Proxy variables of this machine's environment out of the way; set the test's own."""
    for name in PROXY_VARIABLES:
        for spelling in (name, name.lower()):
            monkeypatch.delenv(spelling, raising=False)
    return monkeypatch


PROXY_VARIABLES = ("NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_proxy_variables_are_honoured_though_read_once(
    env: dict[str, str], variable: str, no_proxy_variables: pytest.MonkeyPatch
) -> None:
    monkeypatch = no_proxy_variables
    monkeypatch.setenv(variable, f"http://127.0.0.1:{free_port()}")  # a proxy that is down
    through_proxy = _client(env)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bypassing = _client(env)
    monkeypatch.delenv(variable)  # read at construction: later changes do not matter

    with pytest.raises(Transient, match="cannot reach Miro"):
        through_proxy.refresh(_token())
    with pytest.raises(Refused):  # the sandbox itself, reached directly, refuses the token
        bypassing.refresh(_token())


def test_the_api_url_s_own_path_precedes_every_call_s(env: dict[str, str]) -> None:
    answer = {"access_token": "new-access", "refresh_token": "new-refresh", "expires_in": 3599}
    with _canned(200, json.dumps(answer).encode()) as server:
        _client(env, MIRO_API_URL=f"{server.url}/base/").refresh(_token())
    assert server.requests == ["/base/v1/oauth/token"]


def test_a_plain_http_api_is_reached_through_a_forwarding_proxy(
    env: dict[str, str], no_proxy_variables: pytest.MonkeyPatch
) -> None:
    answer = {"access_token": "new-access", "refresh_token": "new-refresh", "expires_in": 3599}
    with _canned(200, json.dumps(answer).encode()) as proxy:
        no_proxy_variables.setenv("HTTP_PROXY", proxy.url.replace("//", "//ops:pa55@"))
        client = _client(env, MIRO_API_URL="http://miro.invalid/base")
        for _ in range(2):  # the second over the kept-alive connection
            grant = client.refresh(_token())
            assert grant.refresh_token == Secret("new-refresh")

    # The request line names the whole URL, and the proxy's login rides along every time.
    assert proxy.requests == ["http://miro.invalid/base/v1/oauth/token"] * 2
    assert (
        proxy.proxy_logins
        == [urllib3.make_headers(proxy_basic_auth="ops:pa55")["proxy-authorization"]] * 2
    )
    assert len(proxy.connections) == 1


def test_an_https_api_is_tunnelled_through_the_proxy(
    env: dict[str, str], no_proxy_variables: pytest.MonkeyPatch
) -> None:
    with _canned(None) as proxy:  # takes the CONNECT, then hangs up
        no_proxy_variables.setenv("HTTPS_PROXY", proxy.url)
        with pytest.raises(Transient, match="cannot reach Miro"):
            _client(env, MIRO_API_URL="https://miro.invalid").refresh(_token())
    assert proxy.requests == ["miro.invalid:443"]  # the tunnel's end, never a path in clear

    # Inside the tunnel, request lines carry paths: the pool is the tunnel's, to Miro's host.
    pool, prefix = _route("https://miro.invalid/base")
    assert (pool.host, pool.proxy is not None, prefix) == ("miro.invalid", True, "/base")


def test_a_token_that_cannot_be_sent_is_never_quoted(env: dict[str, str]) -> None:
    token = secrets.token_urlsafe(20)
    with pytest.raises(Transient, match="cannot send") as caught:
        _client(env).token_info(Secret(f"{token}\nX-Injected: yes"))
    assert token not in str(caught.value)
    assert caught.value.__cause__ is None
