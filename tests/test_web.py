"""The web app: connect, callback refusals, disconnect, login, hosts, health; over Flask's test
client for request/response checks and over the real ``python -m worker web`` end to end.
"""

from __future__ import annotations

import html
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from settings import Settings, SettingsError
from soak.processes import ServiceProcesses
from tests.conftest import ROOT, free_port, run_cli, wait_for
from worker.constants import CREDENTIAL_KEY_PATTERN, ID_INDEX_COMPLETE, REFRESH_QUEUE
from worker.credential import CredentialId
from worker.listing import PAGE_SIZE
from worker.sandbox import Sandbox
from worker.vault import Vault
from worker.web.app import create_app
from worker.web.state import STATE_TTL, OAuthStates, secret_key

TEAM_ID = "3074457358607431473"
LOGIN = ("operator", "correct-horse-battery")


# Helpers shared with the browser test


@dataclass
class WebProcess:
    url: str
    process: subprocess.Popen[bytes]


@contextmanager
def served_web(env: dict[str, str], logs: Path, **extra: str) -> Iterator[str]:
    """``python -m worker web`` on a free port, as the Procfile runs it; yields its base URL."""
    with web_process(env, logs, **extra) as web:
        yield web.url


@contextmanager
def web_process(env: dict[str, str], logs: Path, **extra: str) -> Iterator[WebProcess]:
    """``python -m worker web`` on a free port; stopped with SIGTERM, which it must obey."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environ = {
        **os.environ,
        **env,
        "MIRO_REDIRECT_URI": f"{url}/oauth/callback",
        "PYTHONPATH": str(ROOT),
        **extra,
    }
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "web.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "web", "--port", str(port)],
            env=environ,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _answers(f"{url}/healthz", process), 30, "the web process to listen")
        yield WebProcess(url, process)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, (logs / "web.log").read_text()


def _answers(url: str, process: subprocess.Popen[bytes]) -> bool:
    assert process.poll() is None, "the web process exited"
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def sandbox_tokens(sandbox: Sandbox) -> list[str]:
    return [grant[kind] for grant in sandbox.grants() for kind in ("access_token", "refresh_token")]


def board_answers(sandbox: Sandbox, vault: Vault, credential_id: CredentialId) -> int:
    """The status of ``GET /v2/boards/{id}`` at the sandbox with the stored access token."""
    token = vault.store.load(credential_id).access_token.reveal()
    headers = {"Authorization": f"Bearer {token}"}
    return requests.get(f"{sandbox.url}/v2/boards/b1", headers=headers, timeout=5).status_code


# The flow over Flask's test client


def _through_miro(authorize_url: str) -> str:
    """Miro's authorize page (the sandbox approves at once): the callback path and query."""
    response = requests.get(authorize_url, allow_redirects=False, timeout=5)
    assert response.status_code == 302, response.text
    location = urlsplit(response.headers["Location"])
    return f"{location.path}?{location.query}"


def _with_query(url: str, **changes: str | None) -> str:
    """``url`` with parameters replaced (a string) or removed (None)."""
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    query.update(changes)
    kept = {name: value for name, value in query.items() if value is not None}
    return urlunsplit(parts._replace(query=urlencode(kept)))


def _param(url: str, name: str) -> str:
    return parse_qs(urlsplit(url).query)[name][0]


@dataclass
class Flow:
    app: Flask
    vault: Vault
    sandbox: Sandbox

    def browser(self) -> FlaskClient:
        return self.app.test_client()

    def start(self, browser: FlaskClient, **query: str) -> str:
        """Press "Connect to Miro": the authorize URL the page redirects to."""
        response = browser.get("/connect", query_string=query)
        assert response.status_code == 302, response.text
        return response.headers["Location"]

    def callback_url(self, browser: FlaskClient) -> str:
        return _through_miro(self.start(browser))

    def link(self, states: OAuthStates) -> str:
        """A callback URL for an operator's link issued by ``states``."""
        return _through_miro(self.vault.client.authorize_url(states.issue(browser=False).token))

    def connected(self, browser: FlaskClient) -> str:
        """A whole successful connect; returns the callback URL it used."""
        url = self.callback_url(browser)
        assert browser.get(url).status_code == 200
        return url


@pytest.fixture
def app(vault: Vault) -> Flask:
    return create_app(vault)


@pytest.fixture
def flow(app: Flask, vault: Vault, sandbox: Sandbox) -> Flow:
    return Flow(app, vault, sandbox)


def test_connect_stores_the_credential_and_shows_it_without_tokens(
    flow: Flow, vault: Vault, sandbox: Sandbox
) -> None:
    browser = flow.browser()
    authorize_url = flow.start(browser, team_id=TEAM_ID)
    assert authorize_url.startswith(f"{sandbox.url}/oauth/authorize?")
    assert _param(authorize_url, "team_id") == TEAM_ID
    assert _param(authorize_url, "redirect_uri") == vault.settings.miro_redirect_uri

    page = browser.get(_through_miro(authorize_url))

    assert page.status_code == 200
    [credential_id] = vault.store.ids()
    assert credential_id.team_id == TEAM_ID
    assert f'id="credential">{credential_id}</dd>' in page.text
    assert "active" in page.text
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    for token in sandbox_tokens(sandbox):
        assert token not in page.text
    assert board_answers(sandbox, vault, credential_id) == 200


def test_a_connection_miro_cannot_name_yet_is_kept_and_the_page_says_so(
    flow: Flow, vault: Vault, sandbox: Sandbox
) -> None:
    sandbox.set_faults(omit_ids=True, token_info_fails=True)
    browser = flow.browser()

    page = browser.get(flow.callback_url(browser))

    assert page.status_code == 202 and "it is kept" in page.text
    for token in sandbox_tokens(sandbox):
        assert token not in page.text
    sandbox.set_faults(token_info_fails=False)
    vault.recover()
    [credential_id] = vault.store.ids()
    assert board_answers(sandbox, vault, credential_id) == 200


def _tampered(flow: Flow) -> tuple[FlaskClient, str]:
    browser = flow.browser()
    url = flow.callback_url(browser)
    state = _param(url, "state")
    middle = len(state) // 2
    flipped = state[:middle] + ("A" if state[middle] != "A" else "B") + state[middle + 1 :]
    return browser, _with_query(url, state=flipped)


def _missing_state(flow: Flow) -> tuple[FlaskClient, str]:
    browser = flow.browser()
    return browser, _with_query(flow.callback_url(browser), state=None)


def _reused(flow: Flow) -> tuple[FlaskClient, str]:
    browser = flow.browser()
    authorize_url = flow.start(browser)
    assert browser.get(_through_miro(authorize_url)).status_code == 200
    return browser, _through_miro(authorize_url)  # a fresh code, the same state


def _expired(flow: Flow) -> tuple[FlaskClient, str]:
    key = secret_key(flow.vault.settings)
    long_ago = OAuthStates(flow.vault.redis, key, clock=lambda: time.time() - STATE_TTL - 5)
    return flow.browser(), flow.link(long_ago)


def _signed_with_another_key(flow: Flow) -> tuple[FlaskClient, str]:
    stranger = OAuthStates(flow.vault.redis, "another-key-" + "x" * 32)
    return flow.browser(), flow.link(stranger)


def _foreign(flow: Flow) -> tuple[FlaskClient, str]:
    return flow.browser(), flow.callback_url(flow.browser())


def _denied(flow: Flow) -> tuple[FlaskClient, str]:
    flow.sandbox.set_faults(deny_authorize=True)
    browser = flow.browser()
    url = flow.callback_url(browser)
    assert _param(url, "error") == "access_denied"
    return browser, url


def _missing_code(flow: Flow) -> tuple[FlaskClient, str]:
    browser = flow.browser()
    return browser, _with_query(flow.callback_url(browser), code=None)


def _code_used(flow: Flow) -> tuple[FlaskClient, str]:
    browser = flow.browser()
    used = _param(flow.connected(browser), "code")
    return browser, _with_query(flow.callback_url(browser), code=used)


BAD_CALLBACKS: dict[str, tuple[Callable[[Flow], tuple[FlaskClient, str]], int, str]] = {
    "tampered state": (_tampered, 400, "not issued by this service"),
    "missing state": (_missing_state, 400, "carries no state"),
    "reused state": (_reused, 400, "used already"),
    "expired state": (_expired, 400, "older than 10 minutes"),
    "state signed with another key": (_signed_with_another_key, 400, "not issued by this service"),
    "state of another browser": (_foreign, 403, "started in another browser"),
    "access_denied from Miro": (_denied, 403, "You declined"),
    "missing code": (_missing_code, 400, "carries no code"),
    "code already used": (_code_used, 400, "Miro refused the code"),
}


def _stored(vault: Vault) -> dict[bytes, bytes | None]:
    return {key: vault.redis.get(key) for key in vault.redis.scan_iter(CREDENTIAL_KEY_PATTERN)}


@pytest.mark.parametrize("case", list(BAD_CALLBACKS))
def test_a_bad_callback_answers_4xx_and_stores_nothing(
    flow: Flow, vault: Vault, sandbox: Sandbox, case: str
) -> None:
    make, status, words = BAD_CALLBACKS[case]
    browser, url = make(flow)
    before, exchanges = _stored(vault), sandbox.stats()["exchanges"]

    page = browser.get(url)

    assert page.status_code == status, page.text
    assert words in page.text
    assert _stored(vault) == before
    assert sandbox.stats()["exchanges"] == exchanges
    for token in sandbox_tokens(sandbox):
        assert token not in page.text


#: What a link's author might write into ``error_description`` on the service's own page.
INJECTED = "Your connection was suspended. Call +1 555 0100 to restore it"


def test_the_callback_checks_the_state_before_showing_anything(flow: Flow) -> None:
    query = {"state": "forged", "error": "access_denied", "error_description": INJECTED}

    page = flow.browser().get("/oauth/callback", query_string=query)

    assert page.status_code == 400 and "not issued by this service" in page.text
    assert INJECTED not in page.text


@pytest.mark.parametrize(
    ("error", "words"),
    [
        ("server_error", "Miro answered with an error (server_error), so nothing"),
        (INJECTED, "Miro answered with an error, so nothing"),
    ],
)
def test_miros_error_is_told_in_fixed_words(
    flow: Flow, vault: Vault, error: str, words: str
) -> None:
    browser = flow.browser()
    url = _with_query(
        flow.callback_url(browser), code=None, error=error, error_description=INJECTED
    )

    page = browser.get(url)

    assert page.status_code == 400 and words in page.text
    assert INJECTED not in page.text
    assert list(vault.store.ids()) == []


def test_a_state_shown_by_another_browser_is_not_spent(flow: Flow, vault: Vault) -> None:
    owner = flow.browser()
    url = flow.callback_url(owner)

    assert flow.browser().get(url).status_code == 403
    assert owner.get(url).status_code == 200
    assert len(list(vault.store.ids())) == 1


def test_an_operator_link_connects_once_without_a_cookie(
    env: dict[str, str], flow: Flow, vault: Vault
) -> None:
    result = run_cli(env, "connect-url", "--team", TEAM_ID)
    assert result.returncode == 0, result.stderr
    authorize_url = result.stdout.strip()
    assert _param(authorize_url, "team_id") == TEAM_ID

    first = flow.browser().get(_through_miro(authorize_url))
    again = flow.browser().get(_through_miro(authorize_url))

    assert first.status_code == 200, first.text
    assert again.status_code == 400 and "used already" in again.text
    [credential_id] = vault.store.ids()
    assert credential_id.team_id == TEAM_ID and str(credential_id) in first.text


def test_connect_refuses_a_team_id_that_is_no_id(flow: Flow) -> None:
    page = flow.browser().get("/connect", query_string={"team_id": "1 OR 1=1"})
    assert page.status_code == 400 and "team_id" in page.text
    assert "1 OR 1=1" not in page.text


def test_the_page_lists_credentials_without_tokens(
    flow: Flow, vault: Vault, sandbox: Sandbox
) -> None:
    stored = [vault.import_response(response) for response in sandbox.create_grants(2)]

    page = flow.browser().get("/")

    assert page.status_code == 200
    assert "Connect to Miro" in page.text
    assert re.search(r'class="value">2</span><span class="label">stored', page.text)
    for credential in stored:
        assert f'data-id="{credential.id}"' in page.text
    for token in sandbox_tokens(sandbox):
        assert token not in page.text


def _csrf(page_text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page_text)
    assert found, page_text
    return found.group(1)


def _shown(page_text: str) -> list[str]:
    """The credential ids of the console's rows, in order."""
    return re.findall(r'<tr data-id="([^"]+)"', page_text)


def _next_link(page_text: str) -> str | None:
    found = re.search(r'<a class="next" rel="next" href="([^"]+)"', page_text)
    return html.unescape(found.group(1)) if found else None


def test_the_console_pages_soonest_due_first_and_back_to_the_first_page(
    flow: Flow, vault: Vault, sandbox: Sandbox
) -> None:
    stored = vault.import_many(sandbox.create_grants(PAGE_SIZE + 10))
    due = sorted(stored, key=lambda credential: vault.store.due_at(credential.id) or 0)
    browser = flow.browser()

    first = browser.get("/")
    second = browser.get(_next_link(first.text) or "no next page")

    assert _shown(first.text) == [str(credential.id) for credential in due[:PAGE_SIZE]]
    assert _shown(second.text) == [str(credential.id) for credential in due[PAGE_SIZE:]]
    assert _next_link(second.text) is None and 'href="/">First page</a>' in second.text


def test_the_console_finds_a_team_and_a_user_by_their_ids(
    flow: Flow, vault: Vault, sandbox: Sandbox
) -> None:
    team = vault.import_many(sandbox.create_grants(3, TEAM_ID))
    [elsewhere] = vault.import_many(sandbox.create_grants(1, "3074457362198745012"))
    browser = flow.browser()

    by_team = browser.get("/", query_string={"q": TEAM_ID})
    by_user = browser.get("/", query_string={"q": f" {elsewhere.id.user_id} "})

    assert sorted(_shown(by_team.text)) == sorted(str(credential.id) for credential in team)
    assert _shown(by_user.text) == [str(elsewhere.id)]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ({"q": "1 OR 1=1"}, "Search by a team id"),
        ({"view": "everything"}, "A view is one of: due, failing, all"),
        ({"cursor": "soon~1:2"}, "out of date or was altered"),
    ],
)
def test_a_query_the_console_cannot_answer_is_a_400_that_says_why(
    flow: Flow, query: dict[str, str], words: str
) -> None:
    page = flow.browser().get("/", query_string=query)
    answer = flow.browser().get("/api/credentials", query_string=query)

    assert page.status_code == 400 and words in page.text
    assert answer.status_code == 400 and words in answer.json["error"]


def test_the_console_says_when_the_id_index_misses_older_credentials(
    flow: Flow, vault: Vault, sandbox: Sandbox
) -> None:
    vault.import_many(sandbox.create_grants(2))
    browser = flow.browser()
    assert "python -m worker reindex" not in browser.get("/").text
    vault.redis.delete(ID_INDEX_COMPLETE)  # as in a store written before the index

    page = browser.get("/", query_string={"view": "all"})

    assert "python -m worker reindex" in page.text
    assert browser.get("/api/credentials").json["index_complete"] is False


def test_the_api_gives_the_figures_and_the_rows_without_tokens(
    flow: Flow, vault: Vault, sandbox: Sandbox
) -> None:
    stored = vault.import_many(sandbox.create_grants(3))
    sandbox.revoke_grant(stored[0].id.team_id, stored[0].id.user_id)
    assert vault.rotate_now(stored[0].id).outcome == "needs_reauth"

    everything = flow.browser().get("/api/credentials", query_string={"view": "all"})
    failing = flow.browser().get("/api/credentials", query_string={"view": "failing"})

    assert everything.status_code == 200
    assert everything.headers["Cache-Control"] == "no-store"
    assert everything.json["summary"]["by_state"] == {"active": 2, "needs_reauth": 1}
    assert everything.json["index_complete"] is True and everything.json["next"] is None
    assert sorted(row["id"] for row in everything.json["rows"]) == sorted(
        str(credential.id) for credential in stored
    )
    [row] = failing.json["rows"]
    assert row["id"] == str(stored[0].id) and row["state"] == "needs_reauth"
    for token in sandbox.issued_tokens():
        assert token not in everything.text and token not in failing.text


def test_the_pages_run_only_the_apps_own_script_and_style(guarded: FlaskClient) -> None:
    page = guarded.get("/", auth=LOGIN)
    style = guarded.get("/static/console.css")
    script = guarded.get("/static/console.js")

    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "style-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "<script>" not in page.text and "<style>" not in page.text
    assert style.status_code == script.status_code == 200  # the callback's page needs them
    assert page.headers["Server-Timing"].startswith("app;dur=")


def test_rotate_without_the_pages_token_queues_nothing(
    flow: Flow, vault: Vault, sandbox: Sandbox
) -> None:
    [credential] = vault.import_many(sandbox.create_grants(1))
    browser = flow.browser()
    browser.get("/")

    page = browser.post("/rotate", data={"id": str(credential.id), "version": "1", "csrf": "x"})

    assert page.status_code == 400
    assert vault.redis.llen(REFRESH_QUEUE) == 0


@pytest.fixture
def worker_process(env: dict[str, str], tmp_path: Path) -> Iterator[ServiceProcesses]:
    """A Celery worker as the Procfile runs it, for the rotations the console queues."""
    processes = ServiceProcesses(env, tmp_path / "worker-logs")
    processes.worker()
    processes.wait_ready()
    yield processes
    processes.stop_all()


def test_rotate_now_is_queued_for_a_worker_and_clicks_on_one_version_make_one_refresh(
    env: dict[str, str],
    tmp_path: Path,
    vault: Vault,
    sandbox: Sandbox,
    worker_process: ServiceProcesses,
) -> None:
    [credential] = vault.import_many(sandbox.create_grants(1))
    with served_web(env, tmp_path / "logs") as url, requests.Session() as browser:
        csrf = _csrf(browser.get(url, timeout=5).text)
        form = {"id": str(credential.id), "version": "1", "csrf": csrf, "view": "all"}
        sent = browser.post(f"{url}/rotate", data=form, allow_redirects=False, timeout=10)
        again = browser.post(
            f"{url}/rotate", data=form, headers={"Accept": "application/json"}, timeout=10
        )
        back = browser.get(f"{url}{sent.headers['Location']}", timeout=5)
        wait_for(lambda: vault.rotator.version_now(credential.id) == 2, 30, "a worker to rotate it")
        wait_for(lambda: vault.redis.llen(REFRESH_QUEUE) == 0, 30, "both requests to be done")

    assert sent.status_code == 303 and sent.headers["Location"] == "/?view=all"
    assert f"Rotation of {credential.id} queued" in back.text
    assert again.status_code == 200 and "queued" in again.json()["message"]
    assert sandbox.stats()["refreshes"] == 1


def test_actions_answer_the_consoles_script_in_json(
    flow: Flow, vault: Vault, sandbox: Sandbox
) -> None:
    [credential] = vault.import_many(sandbox.create_grants(1))
    browser = flow.browser()
    csrf = _csrf(browser.get("/").text)
    form = {"id": str(credential.id), "csrf": csrf}
    wants_json = {"Accept": "application/json"}

    done = browser.post("/disconnect", data=form, headers=wants_json)
    again = browser.post("/disconnect", data=form, headers=wants_json)

    assert done.status_code == 200 and "Miro revoked the grant" in done.json["message"]
    assert again.status_code == 404 and "no credential" in again.json["error"]


def test_disconnect_revokes_at_miro_and_deletes(flow: Flow, vault: Vault, sandbox: Sandbox) -> None:
    [response] = sandbox.create_grants(1)
    credential = vault.import_response(response)
    browser = flow.browser()
    csrf = _csrf(browser.get("/").text)

    answer = browser.post("/disconnect", data={"id": str(credential.id), "csrf": csrf})
    page = browser.get(answer.headers["Location"])

    assert answer.status_code == 303
    assert "Miro revoked the grant" in page.text and f'data-id="{credential.id}"' not in page.text
    assert list(vault.store.ids()) == []
    grant = sandbox.grant(credential.id.team_id, credential.id.user_id)
    assert grant is not None and grant["revoked"]


@pytest.mark.parametrize("csrf", ["forged", "", "jeton-forgé", "\u2028"])
def test_disconnect_without_the_pages_token_changes_nothing(
    flow: Flow, vault: Vault, sandbox: Sandbox, csrf: str
) -> None:
    [response] = sandbox.create_grants(1)
    credential = vault.import_response(response)
    browser = flow.browser()
    browser.get("/")

    page = browser.post("/disconnect", data={"id": str(credential.id), "csrf": csrf})

    assert page.status_code == 400
    assert list(vault.store.ids()) == [credential.id]
    assert sandbox.stats()["revokes"] == 0


def test_disconnect_keeps_the_credential_and_says_so_when_miro_is_unreachable(
    env: dict[str, str], vault: Vault, sandbox: Sandbox
) -> None:
    credential = vault.import_response(sandbox.create_grants(1)[0])
    offline = {**env, "MIRO_API_URL": f"http://127.0.0.1:{free_port()}"}
    browser = create_app(Vault.from_settings(Settings.from_env(offline))).test_client()
    csrf = _csrf(browser.get("/").text)

    page = browser.post("/disconnect", data={"id": str(credential.id), "csrf": csrf})
    cli = run_cli(offline, "revoke", str(credential.id))

    assert page.status_code == 502 and "The credential is kept" in page.text
    assert cli.returncode == 1 and "the credential is kept" in cli.stderr
    assert list(vault.store.ids()) == [credential.id]


def test_revoke_command_disconnects_and_reports_what_miro_knew(
    env: dict[str, str], vault: Vault, sandbox: Sandbox
) -> None:
    credential = vault.import_response(sandbox.create_grants(1)[0])

    result = run_cli(env, "revoke", str(credential.id))
    again = run_cli(env, "revoke", str(credential.id))

    assert result.returncode == 0, result.stderr
    assert '"known_to_miro": true' in result.stdout
    assert list(vault.store.ids()) == []
    assert again.returncode == 1 and "no credential" in again.stderr


@pytest.fixture
def guarded(env: dict[str, str], redis_client: Any) -> FlaskClient:
    settings = Settings.from_env({**env, "WEB_BASIC_AUTH": ":".join(LOGIN)})
    return create_app(Vault.from_settings(settings)).test_client()


@pytest.mark.parametrize("path", ["/", "/api/credentials", "/connect", "/metrics"])
def test_the_operators_pages_ask_for_the_login(guarded: FlaskClient, path: str) -> None:
    assert guarded.get(path).status_code == 401
    assert guarded.get(path, auth=(LOGIN[0], "wrong")).status_code == 401
    assert guarded.get(path, auth=LOGIN).status_code in (200, 302)


def test_the_callback_and_health_need_no_login(guarded: FlaskClient) -> None:
    assert guarded.get("/healthz").status_code == 200
    page = guarded.get("/oauth/callback")  # the state guards it: refused for lack of one
    assert page.status_code == 400 and "carries no state" in page.text


def test_healthz_says_when_refreshing_is_paused(flow: Flow, vault: Vault) -> None:
    browser = flow.browser()
    assert browser.get("/healthz").json == {"ok": True, "redis": "ok", "paused": None}

    vault.rotator.guard.pause("test incident")

    answer = browser.get("/healthz")
    assert answer.status_code == 503 and answer.json["paused"] == "test incident"


def test_the_web_command_refuses_to_listen_beyond_localhost_without_a_login(
    env: dict[str, str],
) -> None:
    result = run_cli(env, "web", "--address", "0.0.0.0", "--port", str(free_port()))
    assert result.returncode == 1
    assert "WEB_BASIC_AUTH" in result.stderr


def test_the_generated_signing_key_is_private_and_stable(settings: Settings) -> None:
    key = secret_key(settings)
    path = settings.data_dir / "web-secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32 and secret_key(settings) == key


def test_the_web_secrets_can_come_from_files_and_a_short_key_is_refused(tmp_path: Path) -> None:
    key, login = tmp_path / "key", tmp_path / "login"
    key.write_text("k" * 40 + "\n")
    login.write_text(":".join(LOGIN) + "\n")

    settings = Settings.from_env(
        {"WEB_SECRET_KEY_FILE": str(key), "WEB_BASIC_AUTH_FILE": str(login)}
    )

    assert settings.web_secret_key == "k" * 40 and settings.web_basic_auth == ":".join(LOGIN)
    assert "k" * 40 not in repr(settings) and LOGIN[1] not in repr(settings)
    with pytest.raises(SettingsError, match="WEB_SECRET_KEY must be at least 32"):
        Settings.from_env({"WEB_SECRET_KEY": "short"})


def test_the_web_process_connects_a_user_end_to_end(
    env: dict[str, str], tmp_path: Path, vault: Vault, sandbox: Sandbox
) -> None:
    login = {"WEB_BASIC_AUTH": ":".join(LOGIN)}
    with served_web(env, tmp_path / "logs", **login) as url, requests.Session() as browser:
        assert browser.get(url, timeout=5).status_code == 401
        browser.auth = LOGIN
        assert "Connect to Miro" in browser.get(url, timeout=5).text

        page = browser.get(f"{url}/connect", timeout=10)  # through the sandbox and back

        assert page.status_code == 200, page.text
        assert urlsplit(page.url).path == "/oauth/callback"
        [credential_id] = vault.store.ids()
        assert str(credential_id) in page.text
        for token in sandbox_tokens(sandbox):
            assert token not in page.text
        assert board_answers(sandbox, vault, credential_id) == 200


# Hosts: a page on another name (DNS rebinding) gets nothing


FOREIGN = "rebound.example"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/connect"),
        ("GET", "/oauth/callback"),
        ("POST", "/disconnect"),
        ("POST", "/rotate"),
        ("GET", "/api/credentials"),
        ("GET", "/metrics"),
        ("GET", "/no-such-page"),
    ],
)
def test_a_foreign_host_gets_a_plain_400_before_the_login(
    flow: Flow, guarded: FlaskClient, method: str, path: str
) -> None:
    for browser, auth in ((flow.browser(), None), (guarded, LOGIN)):
        page = browser.open(path, method=method, headers={"Host": f"{FOREIGN}:5000"}, auth=auth)

        assert page.status_code == 400, page.text
        assert page.content_type.startswith("text/plain")
        assert "WEB_ALLOWED_HOSTS" in page.text and "csrf" not in page.text


def test_healthz_answers_any_host(guarded: FlaskClient) -> None:
    """Load balancers and orchestrators probe it by the machine's address, not by its name."""
    assert guarded.get("/healthz", headers={"Host": FOREIGN}).status_code == 200


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("keeper.example.com", 200),
        ("KEEPER.example.com:443", 200),
        ("10.1.2.3:5000", 200),
        ("keeper.internal", 200),
        ("[fd00::5]:5000", 200),
        ("localhost:5000", 400),
        ("keeper.example.com.rebound.example", 400),
        ("10.1.2.4", 400),
    ],
)
def test_the_redirect_uris_host_the_listening_address_and_the_setting_are_served(
    env: dict[str, str], redis_client: Any, host: str, status: int
) -> None:
    settings = Settings.from_env(
        {
            **env,
            "MIRO_REDIRECT_URI": "https://keeper.example.com/oauth/callback",
            "WEB_ALLOWED_HOSTS": "keeper.internal,[fd00::5]",
        }
    )
    browser = create_app(Vault.from_settings(settings), "10.1.2.3").test_client()

    assert browser.get("/", headers={"Host": host}).status_code == status


def test_the_web_process_refuses_a_page_whose_name_was_rebound(
    env: dict[str, str], tmp_path: Path, vault: Vault, sandbox: Sandbox
) -> None:
    credential = vault.import_response(sandbox.create_grants(1)[0])
    with served_web(env, tmp_path / "logs") as url, requests.Session() as browser:
        rebound = {"Host": f"{FOREIGN}:{urlsplit(url).port}"}
        csrf = _csrf(browser.get(url, timeout=5).text)

        page = browser.get(url, headers=rebound, timeout=5)
        sent = browser.post(
            f"{url}/disconnect",
            data={"id": str(credential.id), "csrf": csrf},
            headers=rebound,
            timeout=5,
        )
        callback = browser.get(f"{url}/oauth/callback", headers=rebound, timeout=5)
        health = browser.get(f"{url}/healthz", headers=rebound, timeout=5)

    assert page.status_code == 400 and "csrf" not in page.text
    assert str(credential.id) not in page.text
    assert sent.status_code == 400 and callback.status_code == 400
    assert list(vault.store.ids()) == [credential.id]
    assert sandbox.stats()["revokes"] == 0
    assert health.status_code == 200


# Clients that never finish a request


STALLED_CLIENTS = 100


@contextmanager
def stalled_connections(url: str, count: int) -> Iterator[None]:
    """``count`` connections that each send half a request line and then nothing."""
    address = urlsplit(url)
    connections = []
    try:
        for _ in range(count):
            connection = socket.create_connection((address.hostname, address.port), timeout=5)
            connections.append(connection)
            connection.sendall(b"GET /heal")
        yield
    finally:
        for connection in connections:
            connection.close()


def _timed(call: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_stalled_connections_leave_health_and_the_callback_answering(
    env: dict[str, str], tmp_path: Path, vault: Vault
) -> None:
    with (
        served_web(env, tmp_path / "logs") as url,
        stalled_connections(url, STALLED_CLIENTS),
        requests.Session() as browser,
    ):
        health, health_took = _timed(lambda: browser.get(f"{url}/healthz", timeout=5))
        authorize_url = browser.get(f"{url}/connect", allow_redirects=False, timeout=5)
        callback_url = _through_miro(authorize_url.headers["Location"])
        page, page_took = _timed(lambda: browser.get(f"{url}{callback_url}", timeout=5))

    assert health.status_code == 200 and health_took < 1, health_took
    assert page.status_code == 200 and page_took < 1, page_took
    assert len(list(vault.store.ids())) == 1


def test_the_web_process_logs_no_code_and_no_state(
    env: dict[str, str], tmp_path: Path, sandbox: Sandbox
) -> None:
    """Tornado logs each request's URL, query string included, unless told not to."""
    logs = tmp_path / "logs"
    with served_web(env, logs) as url, requests.Session() as browser:
        started = browser.get(f"{url}/connect", allow_redirects=False, timeout=5)
        callback_url = _through_miro(started.headers["Location"])
        refused = requests.get(f"{url}{callback_url}", timeout=5)  # another browser: 403
        connected = browser.get(f"{url}{callback_url}", timeout=5)

    assert (refused.status_code, connected.status_code) == (403, 200)
    logged = (logs / "web.log").read_text()
    for secret in (_param(callback_url, "code"), _param(callback_url, "state")):
        assert secret not in logged


def test_sigterm_lets_a_connect_in_flight_finish(
    env: dict[str, str], tmp_path: Path, vault: Vault, sandbox: Sandbox
) -> None:
    """A deploy's SIGTERM during a code exchange: Miro has spent the code, so it must be kept."""
    answered: dict[str, requests.Response] = {}
    with web_process(env, tmp_path / "logs") as web, requests.Session() as browser:
        started = browser.get(f"{web.url}/connect", allow_redirects=False, timeout=5)
        callback_url = f"{web.url}{_through_miro(started.headers['Location'])}"
        sandbox.set_faults(hold=True)
        callback = threading.Thread(
            target=lambda: answered.update(page=browser.get(callback_url, timeout=30))
        )
        callback.start()
        wait_for(lambda: sandbox.stats()["held"] == 1, message="the exchange to reach Miro")

        web.process.send_signal(signal.SIGTERM)
        wait_for(lambda: not _listening(web.url), message="the web process to stop listening")
        sandbox.set_faults(hold=False)
        callback.join(timeout=30)

        assert web.process.wait(timeout=30) == 0
    assert answered["page"].status_code == 200
    assert len(list(vault.store.ids())) == 1


def _listening(url: str) -> bool:
    address = urlsplit(url)
    try:
        socket.create_connection((address.hostname, address.port), timeout=1).close()
    except ConnectionRefusedError:
        return False
    return True
