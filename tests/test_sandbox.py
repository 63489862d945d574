"""The Miro sandbox, tested as its users meet it: a real server on a real port, over HTTP.

Every test starts its own ``Sandbox`` on port 0 with a fake clock, so expiry is exact and
tests can run in parallel without sharing state.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.conftest import wait_for
from worker.sandbox import Faults, Sandbox, SandboxConfig

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID = "3458764500000000042"
CLIENT_SECRET = secrets.token_urlsafe(24)
REDIRECT_URI = "http://127.0.0.1:5000/oauth/callback"
DEFAULT_TEAM_ID = "3074457358607431473"
TIMEOUT = 5.0


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def start_sandbox(clock: FakeClock, faults: Faults | None = None, **config: Any) -> Sandbox:
    settings = SandboxConfig(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, clock=clock, **config
    )
    return Sandbox(settings, faults).start()


@pytest.fixture
def box(clock: FakeClock) -> Iterator[Sandbox]:
    with start_sandbox(clock) as running:
        yield running


def wait_for_stat(box: Sandbox, name: str, value: int) -> None:
    wait_for(lambda: box.stats()[name] == value, message=f"{name} == {value}")


def authorize(box: Sandbox, **params: str) -> requests.Response:
    query = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT_URI}
    return requests.get(
        f"{box.url}/oauth/authorize",
        params={**query, **params},
        allow_redirects=False,
        timeout=TIMEOUT,
    )


def redirect_query(response: requests.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    return {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}


def get_code(box: Sandbox, **params: str) -> str:
    return redirect_query(authorize(box, **params))["code"]


def token_call(box: Sandbox, timeout: float = TIMEOUT, **params: str) -> requests.Response:
    form = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **params}
    return requests.post(f"{box.url}/v1/oauth/token", data=form, timeout=timeout)


def exchange(box: Sandbox, code: str, redirect_uri: str = REDIRECT_URI) -> requests.Response:
    return token_call(box, grant_type="authorization_code", code=code, redirect_uri=redirect_uri)


def refresh(box: Sandbox, refresh_token: str, **kwargs: Any) -> requests.Response:
    return token_call(box, grant_type="refresh_token", refresh_token=refresh_token, **kwargs)


def connect(box: Sandbox, **params: str) -> dict[str, Any]:
    response = exchange(box, get_code(box, **params))
    assert response.status_code == 200, response.text
    return response.json()


def board(box: Sandbox, access_token: str, board_id: str = "uXjVOD6LSME=") -> requests.Response:
    headers = {"Authorization": f"Bearer {access_token}"}
    return requests.get(f"{box.url}/v2/boards/{board_id}", headers=headers, timeout=TIMEOUT)


def token_info(box: Sandbox, access_token: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {access_token}"}
    return requests.get(f"{box.url}/v1/oauth-token", headers=headers, timeout=TIMEOUT)


def revoke(box: Sandbox, access_token: str, secret: str = CLIENT_SECRET) -> requests.Response:
    body = {"accessToken": access_token, "clientId": CLIENT_ID, "clientSecret": secret}
    return requests.post(f"{box.url}/v2/oauth/revoke", json=body, timeout=TIMEOUT)


def control(box: Sandbox, method: str, path: str, **body: Any) -> requests.Response:
    return requests.request(
        method, f"{box.url}/_sandbox/{path}", json=body or None, timeout=TIMEOUT
    )


def miro_error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"status": status, "code": code, "message": message, "type": "error"}


INVALID_REFRESH = miro_error(400, "invalidGrant", "Invalid refresh token")
INVALID_CLIENT = miro_error(
    401, "unauthorized", "Client authentication failed: invalid client id or secret"
)


# The happy path, step by step as in Miro's guide


def test_authorize_exchange_token_info_and_board(box: Sandbox, clock: FakeClock) -> None:
    query = redirect_query(authorize(box, state="xyz"))
    assert query.keys() == {"code", "state", "client_id", "team_id"}
    assert query["state"] == "xyz"
    assert (query["client_id"], query["team_id"]) == (CLIENT_ID, DEFAULT_TEAM_ID)

    response = exchange(box, query["code"])
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert list(body) == [
        "user_id",
        "refresh_token",
        "access_token",
        "expires_in",
        "team_id",
        "scope",
        "token_type",
    ]
    assert re.fullmatch(r"[1-9][0-9]{18}", body["user_id"])
    assert body["team_id"] == DEFAULT_TEAM_ID
    assert (body["expires_in"], body["scope"], body["token_type"]) == (
        3599,
        "boards:write boards:read",
        "bearer",
    )
    assert re.fullmatch(r"[A-Za-z0-9_-]{55,65}", body["access_token"])
    assert body["access_token"] != body["refresh_token"]

    info = token_info(box, body["access_token"])
    assert info.status_code == 200
    user = {"type": "user", "id": body["user_id"], "name": f"Sandbox user {body['user_id']}"}
    assert info.json() == {
        "type": "oauth_token",
        "organization": {
            "type": "organization",
            "id": "3458764500000000100",
            "name": "Sandbox organization",
        },
        "team": {"type": "team", "id": DEFAULT_TEAM_ID, "name": "Sandbox team"},
        "user": user,
        "createdBy": user,
        "scopes": ["boards:write", "boards:read"],
    }

    found = board(box, body["access_token"], "uXjVOD6LSME=")
    assert found.status_code == 200
    assert found.json()["id"] == "uXjVOD6LSME=" and found.json()["description"] == ""
    assert found.json()["owner"]["id"] == body["user_id"]

    grant = box.grant(DEFAULT_TEAM_ID, body["user_id"])
    assert grant is not None
    assert (grant["access_token"], grant["refresh_token"]) == (
        body["access_token"],
        body["refresh_token"],
    )
    assert grant["access_expires_at"] == clock.now + 3599
    assert box.stats()["exchanges"] == 1


def test_authorize_honours_team_and_user_and_keeps_redirect_query(box: Sandbox) -> None:
    redirect_uri = REDIRECT_URI + "?tenant=a"
    response = authorize(box, redirect_uri=redirect_uri, team_id="42", user_id="7")
    assert response.status_code == 302
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    assert query["tenant"] == ["a"]
    assert query["team_id"] == ["42"]
    assert "state" not in query

    body = exchange(box, query["code"][0], redirect_uri).json()
    assert (body["team_id"], body["user_id"]) == ("42", "7")


@pytest.mark.parametrize(
    "params",
    [{"client_id": "someone-else"}, {"response_type": "token"}, {"team_id": "not-a-number"}],
)
def test_authorize_refuses_bad_requests_without_redirecting(
    box: Sandbox, params: dict[str, str]
) -> None:
    response = authorize(box, **params)
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert response.headers["Content-Type"].startswith("text/html")


def test_token_endpoint_accepts_parameters_in_the_query_string(box: Sandbox) -> None:
    params = {
        "grant_type": "authorization_code",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "code": get_code(box),
        "redirect_uri": REDIRECT_URI,
    }
    response = requests.post(f"{box.url}/v1/oauth/token", params=params, timeout=TIMEOUT)
    assert response.status_code == 200
    assert board(box, response.json()["access_token"]).status_code == 200


# Rotation


def test_refresh_rotates_both_tokens_and_counts_a_reused_refresh_token(box: Sandbox) -> None:
    first = connect(box)
    response = refresh(box, first["refresh_token"])
    assert response.status_code == 200
    second = response.json()
    assert list(second) == [
        "token_type",
        "team_id",
        "access_token",
        "refresh_token",
        "scope",
        "expires_in",
    ]
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]

    reused = refresh(box, first["refresh_token"])
    assert (reused.status_code, reused.json()) == (400, INVALID_REFRESH)

    stats = box.stats()
    assert (stats["refreshes"], stats["reused_refresh_tokens"]) == (1, 1)
    assert stats["invalid_refresh_tokens"] == 0
    grant = box.grant(DEFAULT_TEAM_ID, first["user_id"])
    assert grant is not None
    assert grant["rotations"] == 1
    assert grant["refresh_token"] == second["refresh_token"]
    assert refresh(box, second["refresh_token"]).status_code == 200

    unknown = refresh(box, "never-issued")
    assert unknown.status_code == 400
    assert box.stats()["invalid_refresh_tokens"] == 1


def test_old_access_token_is_stale_after_a_refresh(box: Sandbox) -> None:
    first = connect(box)
    second = refresh(box, first["refresh_token"]).json()

    stale = board(box, first["access_token"])
    assert stale.status_code == 401
    assert stale.json()["code"] == "invalidToken"
    info = token_info(box, first["access_token"])
    assert info.status_code == 400
    assert info.json() == miro_error(400, "invalidToken", "Invalid token provided")

    stats = box.stats()
    assert stats["stale_access_token_uses"] == 2
    assert stats["expired_access_token_uses"] == 0
    assert board(box, second["access_token"]).status_code == 200


def test_expired_access_token_is_counted_apart_from_stale(box: Sandbox, clock: FakeClock) -> None:
    creds = connect(box)
    clock.advance(3598)
    assert board(box, creds["access_token"]).status_code == 200
    clock.advance(1)

    expired = board(box, creds["access_token"])
    assert expired.status_code == 401
    assert expired.json()["code"] == "invalidToken"
    stats = box.stats()
    assert (stats["expired_access_token_uses"], stats["stale_access_token_uses"]) == (1, 0)
    assert stats["board_calls"] == 2
    assert refresh(box, creds["refresh_token"]).status_code == 200


def test_refresh_token_expires_and_each_rotation_restarts_its_clock(
    clock: FakeClock,
) -> None:
    with start_sandbox(clock, refresh_ttl=1000) as box:
        first, second = box.create_grants(2)
        clock.advance(999)
        rotated = refresh(box, first["refresh_token"]).json()
        clock.advance(1)
        assert refresh(box, second["refresh_token"]).json() == INVALID_REFRESH
        assert box.stats()["invalid_refresh_tokens"] == 1
        clock.advance(998)
        assert refresh(box, rotated["refresh_token"]).status_code == 200


def test_refresh_response_carries_team_id_as_a_bare_number_above_2_53(box: Sandbox) -> None:
    creds = connect(box)
    text = refresh(box, creds["refresh_token"]).text
    match = re.search(r'"team_id":\s*([0-9]+)\s*[,}]', text)
    assert match, text
    assert match.group(1) == DEFAULT_TEAM_ID
    assert int(match.group(1)) > 2**53
    assert "user_id" not in json.loads(text)


def test_concurrent_refreshes_of_one_token_succeed_exactly_once(box: Sandbox) -> None:
    [creds] = box.create_grants(1)
    start = threading.Barrier(8)
    statuses: list[int] = []

    def race() -> None:
        start.wait()
        statuses.append(refresh(box, creds["refresh_token"]).status_code)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(statuses) == [200] + [400] * 7
    assert (box.stats()["refreshes"], box.stats()["reused_refresh_tokens"]) == (1, 7)


# Codes and client authentication


def test_code_is_single_use_and_redirect_uri_must_match(box: Sandbox) -> None:
    code = get_code(box)
    mismatch = exchange(box, code, "http://127.0.0.1:5000/elsewhere")
    assert mismatch.status_code == 401
    assert mismatch.json() == miro_error(401, "oauthError", "Redirect URI mismatch.")

    assert exchange(box, code).status_code == 200
    again = exchange(box, code)
    assert again.status_code == 400
    assert again.json() == miro_error(400, "invalidGrant", "Invalid authorization code")
    assert box.stats()["exchanges"] == 1


def test_code_expires_after_ten_minutes(box: Sandbox, clock: FakeClock) -> None:
    fresh, stale = get_code(box), get_code(box)
    clock.advance(599)
    assert exchange(box, fresh).status_code == 200
    clock.advance(1)
    assert exchange(box, stale).json()["code"] == "invalidGrant"


def test_wrong_client_secret_is_401_before_anything_else(box: Sandbox) -> None:
    creds = connect(box)
    wrong = refresh(box, creds["refresh_token"], client_secret="wrong")
    assert (wrong.status_code, wrong.json()) == (401, INVALID_CLIENT)
    assert exchange_with_secret(box, "wrong").json() == INVALID_CLIENT
    assert box.stats()["refreshes"] == 0
    assert refresh(box, creds["refresh_token"]).status_code == 200


def exchange_with_secret(box: Sandbox, secret: str) -> requests.Response:
    return token_call(
        box,
        grant_type="authorization_code",
        code=get_code(box),
        redirect_uri=REDIRECT_URI,
        client_secret=secret,
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "Missing parameter: grant_type"),
        ({"grant_type": "refresh_token"}, "Missing parameter: refresh_token"),
        ({"grant_type": "authorization_code", "code": "x"}, "Missing parameter: redirect_uri"),
        ({"grant_type": "password"}, "Unsupported grant type"),
    ],
)
def test_malformed_token_requests_are_invalid_parameters(
    box: Sandbox, params: dict[str, str], message: str
) -> None:
    response = token_call(box, **params)
    assert (response.status_code, response.json()) == (
        400,
        miro_error(400, "invalidParameters", message),
    )


def test_rfc6749_dialect(clock: FakeClock) -> None:
    with start_sandbox(clock, dialect="rfc6749") as box:
        [creds] = box.create_grants(1)
        wrong = refresh(box, creds["refresh_token"], client_secret="wrong")
        assert wrong.status_code == 401
        assert wrong.json()["error"] == "invalid_client"
        assert refresh(box, creds["refresh_token"]).status_code == 200
        reused = refresh(box, creds["refresh_token"])
        assert reused.status_code == 400
        assert reused.json() == {
            "error": "invalid_grant",
            "error_description": "Invalid refresh token",
        }
        assert token_call(box).json()["error"] == "invalid_request"
        mismatch = exchange(box, get_code(box), "http://elsewhere/")
        assert (mismatch.status_code, mismatch.json()["error"]) == (400, "invalid_grant")


UNIFORM = miro_error(401, "oauthError", "Unauthorized")


def test_the_uniform_dialect_words_every_refusal_of_every_endpoint_alike(
    clock: FakeClock,
) -> None:
    with start_sandbox(clock, dialect="uniform") as box:
        creds = connect(box)
        used_code = get_code(box)
        assert exchange(box, used_code).status_code == 200
        refusals = [
            refresh(box, creds["refresh_token"], client_secret="wrong"),
            refresh(box, "not-a-token"),
            exchange(box, used_code),
            exchange(box, get_code(box), "http://elsewhere/"),
            token_call(box, grant_type="refresh_token"),
            token_call(box),
            token_call(box, grant_type="password"),
            revoke(box, creds["access_token"], secret="wrong"),
            revoke(box, "not-a-token"),
            requests.post(f"{box.url}/v2/oauth/revoke", json={}, timeout=TIMEOUT),
            token_info(box, "not-a-token"),
            requests.get(f"{box.url}/v1/oauth-token", timeout=TIMEOUT),
            board(box, "not-a-token"),
        ]
        assert [(r.status_code, r.json()) for r in refusals] == [(401, UNIFORM)] * len(refusals)
        assert refresh(box, creds["refresh_token"]).status_code == 200  # nothing was spent


def test_the_dialect_changes_while_running_and_reset_brings_the_first_back(
    box: Sandbox,
) -> None:
    assert control(box, "GET", "dialect").json() == {"dialect": "miro"}
    assert control(box, "POST", "dialect", dialect="uniform").json() == {"dialect": "uniform"}
    assert (refresh(box, "not-a-token").status_code, box.dialect) == (401, "uniform")
    rejected = control(box, "POST", "dialect", dialect="klingon")
    assert rejected.status_code == 400 and "miro, rfc6749, uniform" in rejected.json()["error"]
    box.set_dialect("rfc6749")
    assert refresh(box, "not-a-token").json()["error"] == "invalid_grant"
    box.reset()
    assert refresh(box, "not-a-token").json() == INVALID_REFRESH
    with pytest.raises(ValueError, match="dialect must be one of"):
        SandboxConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, dialect="x")  # type: ignore[arg-type]


# Revocation


def test_revoke_kills_the_grant_and_its_refresh_token(box: Sandbox) -> None:
    creds = connect(box)
    assert revoke(box, creds["access_token"], secret="wrong").status_code == 401
    assert revoke(box, creds["access_token"]).status_code == 204
    assert revoke(box, creds["access_token"]).status_code == 404

    assert refresh(box, creds["refresh_token"]).json() == INVALID_REFRESH
    assert board(box, creds["access_token"]).status_code == 401
    grant = box.grant(DEFAULT_TEAM_ID, creds["user_id"])
    assert grant is not None
    assert grant["revoked"]
    stats = box.stats()
    assert (stats["revokes"], stats["invalid_refresh_tokens"]) == (1, 1)


@pytest.mark.parametrize(("dialect", "refused"), [("miro", 404), ("uniform", 401)])
def test_an_expired_access_token_is_not_revoked(
    clock: FakeClock, dialect: Any, refused: int
) -> None:
    with start_sandbox(clock, dialect=dialect, access_ttl=60) as box:
        creds = connect(box)
        clock.advance(60)
        assert revoke(box, creds["access_token"]).status_code == refused
        assert box.stats()["revokes"] == 0
        renewed = refresh(box, creds["refresh_token"]).json()  # the grant lives on
        assert revoke(box, renewed["access_token"]).status_code == 204


def test_revoke_grant_acts_as_an_uninstall(box: Sandbox) -> None:
    creds = connect(box)
    ids = {"team_id": creds["team_id"], "user_id": creds["user_id"]}
    assert control(box, "POST", "revoke_grant", **ids).status_code == 204
    assert control(box, "POST", "revoke_grant", **ids).status_code == 404
    assert refresh(box, creds["refresh_token"]).status_code == 400
    assert box.stats()["uninstalls"] == 1

    other = connect(box)
    assert box.revoke_grant(other["team_id"], other["user_id"])
    assert not box.revoke_grant(other["team_id"], other["user_id"])


# Faults


def test_error_rate_answers_500_before_doing_anything(box: Sandbox) -> None:
    [creds] = box.create_grants(1)
    box.set_faults(error_rate=1.0)
    response = refresh(box, creds["refresh_token"])
    assert response.status_code == 500
    stats = box.stats()
    assert (stats["errors_injected"], stats["token_calls"], stats["refreshes"]) == (1, 1, 0)
    box.set_faults(error_rate=0.0)
    assert refresh(box, creds["refresh_token"]).status_code == 200


def test_rate_limit_answers_429_with_headers(box: Sandbox, clock: FakeClock) -> None:
    [creds] = box.create_grants(1)
    box.set_faults(rate_limit_rate=1.0, rate_limit_reset_s=3)
    response = refresh(box, creds["refresh_token"])
    assert response.status_code == 429
    assert response.json() == {
        "status": 429,
        "code": "tooManyRequests",
        "message": "Request rate limit exceed",
        "context": None,
        "type": "error",
    }
    assert int(response.headers["X-RateLimit-Limit"]) > 0
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert int(response.headers["X-RateLimit-Reset"]) == int(clock.now) + 3
    assert response.headers["Retry-After"] == "3"
    assert box.stats()["rate_limited"] == 1
    assert box.grant(creds["team_id"], creds["user_id"])["rotations"] == 0  # type: ignore[index]


def test_hang_outlasts_the_client_timeout_and_then_rotates(box: Sandbox) -> None:
    [creds] = box.create_grants(1)
    box.set_faults(hang_rate=1.0, hang_s=0.8)
    with pytest.raises(requests.Timeout):
        refresh(box, creds["refresh_token"], timeout=0.2)
    wait_for(lambda: box.stats()["hung"] == 1)
    # The server answers normally once the stall is over: the client never learns of it.
    wait_for(lambda: box.stats()["refreshes"] == 1)
    assert refresh(box, creds["refresh_token"]).status_code == 400


@pytest.mark.parametrize("mode", ["502", "drop"])
def test_lost_answer_rotates_without_delivering(box: Sandbox, mode: str) -> None:
    [creds] = box.create_grants(1)
    box.set_faults(lose_rate=1.0, lose_mode=mode)
    if mode == "502":
        response = refresh(box, creds["refresh_token"])
        assert response.status_code == 502
        assert response.headers["Content-Type"].startswith("text/html")
        assert creds["refresh_token"][:20] not in response.text
    else:
        with pytest.raises(requests.ConnectionError):
            refresh(box, creds["refresh_token"])
    grant = box.grant(creds["team_id"], creds["user_id"])
    assert grant is not None
    assert (grant["lost"], grant["rotations"]) == (True, 1)
    assert grant["refresh_token"] != creds["refresh_token"]
    assert box.stats()["lost"] == 1

    box.set_faults(lose_rate=0.0)
    assert refresh(box, creds["refresh_token"]).status_code == 400
    # Finding out is no client bug: counted apart from reused_refresh_tokens.
    assert box.stats()["reused_after_loss"] == 1
    assert box.stats()["reused_refresh_tokens"] == 0
    assert refresh(box, grant["refresh_token"]).status_code == 200


def test_reject_all_refresh_answers_as_a_revoked_secret_and_rotates_nothing(
    box: Sandbox,
) -> None:
    [creds] = box.create_grants(1)
    box.set_faults(reject_all_refresh=True)
    response = refresh(box, creds["refresh_token"])
    assert (response.status_code, response.json()) == (401, INVALID_CLIENT)
    assert box.grant(creds["team_id"], creds["user_id"])["rotations"] == 0  # type: ignore[index]
    box.set_faults(reject_all_refresh=False)
    assert refresh(box, creds["refresh_token"]).status_code == 200


def test_echo_tokens_quotes_what_a_refused_call_carried_and_its_grants_tokens(
    box: Sandbox,
) -> None:
    [creds] = box.create_grants(1)
    box.set_faults(echo_tokens=True, reject_all_refresh=True)
    pair = [creds["access_token"], creds["refresh_token"]]

    refused = refresh(box, creds["refresh_token"]).json()
    unknown = revoke(box, "not-a-token", secret="wrong").json()
    invalid = token_info(box, "stale").json()
    answered = token_info(box, creds["access_token"])

    assert refused["code"] == "unauthorized"
    assert set(refused["context"]["tokens"]) == {*pair, CLIENT_SECRET}
    assert all(token in refused["message"] for token in [*pair, CLIENT_SECRET])
    assert unknown["context"]["tokens"] == ["not-a-token", "wrong"]
    assert invalid["context"]["tokens"] == ["stale"] and "stale" in invalid["message"]
    assert answered.status_code == 200 and "tokens" not in answered.text


def test_omit_ids_answers_exchanges_without_user_or_team(box: Sandbox) -> None:
    box.set_faults(omit_ids=True)
    answer = connect(box)
    assert "user_id" not in answer and "team_id" not in answer
    info = token_info(box, answer["access_token"]).json()
    assert box.grant(info["team"]["id"], info["user"]["id"]) is not None


def test_token_info_fails_answers_500_and_leaves_the_token_alive(box: Sandbox) -> None:
    [creds] = box.create_grants(1)
    box.set_faults(token_info_fails=True)
    assert token_info(box, creds["access_token"]).status_code == 500
    box.set_faults(token_info_fails=False)
    assert token_info(box, creds["access_token"]).status_code == 200


def test_deny_authorize_redirects_with_access_denied(box: Sandbox) -> None:
    box.set_faults(deny_authorize=True)
    query = redirect_query(authorize(box, state="s1"))
    assert query["error"] == "access_denied"
    assert query["error_description"]
    assert query["state"] == "s1"
    assert "code" not in query


def test_latency_slows_miro_endpoints_but_not_controls(clock: FakeClock) -> None:
    with start_sandbox(clock, Faults(latency_ms=500)) as box:
        started = time.monotonic()
        assert board(box, "nothing").status_code == 401
        assert time.monotonic() - started >= 0.5
        started = time.monotonic()
        assert control(box, "GET", "stats").status_code == 200
        assert time.monotonic() - started < 0.5


def test_faults_can_be_read_and_changed_over_http(box: Sandbox) -> None:
    response = control(box, "POST", "faults", error_rate=0.25, lose_mode="drop")
    assert response.status_code == 200
    assert response.json() == {**Faults().as_dict(), "error_rate": 0.25, "lose_mode": "drop"}
    assert box.faults == Faults(error_rate=0.25, lose_mode="drop")
    assert control(box, "GET", "faults").json()["error_rate"] == 0.25

    for bad in ({"error_rate": 2}, {"no_such_fault": 1}, {"deny_authorize": "yes"}):
        rejected = control(box, "POST", "faults", **bad)
        assert rejected.status_code == 400
        assert rejected.json()["error"]
    assert box.faults.error_rate == 0.25
    with pytest.raises(ValueError):
        box.set_faults(hang_rate=-0.1)


def test_seeded_faults_fire_on_the_same_calls(clock: FakeClock) -> None:
    def statuses() -> list[int]:
        with start_sandbox(clock, Faults(error_rate=0.5, seed=7)) as box:
            return [token_call(box).status_code for _ in range(16)]

    first = statuses()
    assert set(first) == {400, 500}
    assert statuses() == first


# Sandbox controls


def test_create_grants_returns_exchange_responses_that_work(box: Sandbox) -> None:
    responses = box.create_grants(3)
    assert len({r["user_id"] for r in responses}) == 3
    assert all(r["team_id"] == DEFAULT_TEAM_ID and r["expires_in"] == 3599 for r in responses)
    assert board(box, responses[0]["access_token"]).status_code == 200
    assert refresh(box, responses[1]["refresh_token"]).status_code == 200

    over_http = control(box, "POST", "grants", count=2, team_id="123456789")
    assert over_http.status_code == 200
    seeded = over_http.json()["responses"]
    assert list(seeded[0]) == list(responses[0])
    assert {r["team_id"] for r in seeded} == {"123456789"}
    assert token_info(box, seeded[0]["access_token"]).json()["team"]["id"] == "123456789"

    stats = box.stats()
    assert (stats["grants_created"], stats["exchanges"]) == (5, 0)
    listed = control(box, "GET", "grants").json()
    assert len(listed) == 5
    assert listed == box.grants()
    assert control(box, "POST", "grants", count="many").status_code == 400


def test_create_grants_is_fast_enough_to_seed_benchmarks(box: Sandbox) -> None:
    started = time.monotonic()
    response = control(box, "POST", "grants", count=20_000)
    assert response.status_code == 200
    assert len(response.json()["responses"]) == 20_000
    assert time.monotonic() - started < 3.0


def test_stats_over_http_match_python(box: Sandbox) -> None:
    creds = connect(box)
    refresh(box, creds["refresh_token"])
    refresh(box, creds["refresh_token"])
    board(box, creds["access_token"])
    over_http = control(box, "GET", "stats").json()
    assert over_http == box.stats()
    assert over_http["token_calls"] == 3
    assert over_http["reused_refresh_tokens"] == 1
    assert over_http["stale_access_token_uses"] == 1


def test_reset_forgets_everything_and_clears_faults(box: Sandbox) -> None:
    creds = connect(box)
    box.set_faults(error_rate=1.0)
    assert control(box, "POST", "reset").status_code == 204
    assert box.grants() == []
    assert set(box.stats().values()) == {0}
    assert box.faults == Faults()
    assert refresh(box, creds["refresh_token"]).status_code == 400


AUTHORIZE = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT_URI}


@pytest.mark.parametrize(
    ("path", "query"), [("/_sandbox/grants", {}), ("/oauth/authorize", AUTHORIZE)]
)
def test_a_foreign_host_is_refused(box: Sandbox, path: str, query: dict[str, str]) -> None:
    """``/_sandbox/`` lists every token: a page whose name was rebound to 127.0.0.1 reads none."""
    connect(box)
    foreign = {"Host": f"rebound.example:{urlsplit(box.url).port}"}
    by_name = box.url.replace("127.0.0.1", "localhost")

    refused = requests.get(
        f"{box.url}{path}", query, headers=foreign, allow_redirects=False, timeout=TIMEOUT
    )
    served = requests.get(f"{by_name}{path}", query, allow_redirects=False, timeout=TIMEOUT)

    assert refused.status_code == 400 and "token" not in refused.text
    assert served.status_code in (200, 302)


def test_no_request_line_or_token_is_logged(box: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    [creds] = box.create_grants(1)
    params = {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": creds["refresh_token"],
    }
    response = requests.post(f"{box.url}/v1/oauth/token", params=params, timeout=TIMEOUT)
    assert response.status_code == 200
    board(box, response.json()["access_token"])
    # The client's own debug log (urllib3) quotes the URL; the server's must not.
    server_records = [r for r in caplog.records if not r.name.startswith("urllib3")]
    logged = "\n".join(record.getMessage() for record in server_records)
    assert creds["refresh_token"] not in logged
    assert response.json()["access_token"] not in logged
    assert CLIENT_SECRET not in logged
    assert not [record for record in server_records if record.name == "werkzeug"]


def test_command_line_serves_until_sigterm() -> None:
    command = [
        sys.executable,
        "-m",
        "worker.sandbox",
        "--port",
        "0",
        f"--client-id={CLIENT_ID}",
        f"--client-secret={CLIENT_SECRET}",  # "=": a generated secret may begin with "-"
        "--access-ttl",
        "60",
        "--dialect",
        "uniform",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT) as proc:
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 15)
            assert ready, "the sandbox printed no URL"
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
            seeded = requests.post(f"{url}/_sandbox/grants", json={"count": 1}, timeout=TIMEOUT)
            assert seeded.json()["responses"][0]["expires_in"] == 60
            refused = requests.get(f"{url}/v1/oauth-token", timeout=TIMEOUT)
            assert (refused.status_code, refused.json()) == (401, UNIFORM)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_rotation_for_a_client_that_hung_up_is_counted_as_orphaned(box: Sandbox) -> None:
    creds = box.create_grants(1)[0]
    box.set_faults(hang_rate=1.0, hang_s=0.5)
    with pytest.raises(requests.Timeout):
        refresh(box, creds["refresh_token"], timeout=0.1)  # the client gives up first
    wait_for_stat(box, "orphaned", 1)
    grant = box.grant(creds["team_id"], creds["user_id"])
    assert grant is not None and grant["lost"] and grant["rotations"] == 1
    box.set_faults(hang_rate=0.0)
    assert refresh(box, creds["refresh_token"]).status_code == 400
    assert box.stats()["reused_after_loss"] == 1
    assert box.stats()["reused_refresh_tokens"] == 0


def test_hold_freezes_token_calls_until_released(box: Sandbox) -> None:
    creds = box.create_grants(1)[0]
    box.set_faults(hold=True)
    answers: list[int] = []
    caller = threading.Thread(
        target=lambda: answers.append(refresh(box, creds["refresh_token"]).status_code)
    )
    caller.start()
    wait_for_stat(box, "held", 1)
    assert box.stats()["token_in_flight"] == 1 and answers == []
    box.set_faults(hold=False)
    caller.join(timeout=5)
    assert answers == [200]
    assert (box.stats()["held"], box.stats()["token_in_flight"]) == (0, 0)


def test_a_late_echo_of_an_abandoned_call_is_no_client_bug(box: Sandbox) -> None:
    creds = box.create_grants(1)[0]
    box.set_faults(hang_rate=1.0, hang_s=1.0)
    with pytest.raises(requests.Timeout):
        refresh(box, creds["refresh_token"], timeout=0.1)  # gives up, the call stays stuck
    box.set_faults(hang_rate=0.0)
    assert refresh(box, creds["refresh_token"]).status_code == 200  # the retry wins
    wait_for(lambda: box.stats()["token_in_flight"] == 0, message="the stuck call to end")
    assert box.stats()["reused_after_loss"] == 1
    assert box.stats()["reused_refresh_tokens"] == 0
    assert box.stats()["orphaned"] == 0
