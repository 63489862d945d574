"""The integrator's session: current token on every call, one retry after a rotation's 401."""

from __future__ import annotations

import ast
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from settings import Settings
from tests.conftest import ROOT, run_python, wait_for
from worker.client import miro_session
from worker.credential import Credential
from worker.sandbox import Sandbox
from worker.vault import Vault

THREADS = 20
ROTATIONS = 5


@pytest.fixture
def credential(sandbox: Sandbox, vault: Vault) -> Credential:
    return vault.import_response(sandbox.create_grants(1)[0])


def test_a_call_carries_the_stored_token(
    sandbox: Sandbox, vault: Vault, credential: Credential
) -> None:
    with miro_session(vault, str(credential.id)) as miro:
        board = miro.get("/v2/boards/uXjVO1")

    assert board.status_code == 200
    assert board.json()["owner"]["id"] == credential.id.user_id
    assert sandbox.stats()["board_calls"] == 1


def test_the_guides_example_lists_a_board(
    env: dict[str, str], sandbox: Sandbox, credential: Credential
) -> None:
    guide = (ROOT / "docs" / "guide.md").read_text()
    section = guide.split("### From Python, with requests", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert example, "the guide has no Python example under 'Call Miro from your code'"
    code = example.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    code = code.replace("3074457358607431473:3458764513820540928", str(credential.id))

    result = run_python(env, "-c", code)

    assert result.returncode == 0, result.stderr
    assert ast.literal_eval(result.stdout)["type"] == "board"  # the printed .json()
    assert sandbox.stats()["board_calls"] == 1


def test_a_url_outside_miro_is_refused_before_the_token_leaves(
    sandbox: Sandbox, vault: Vault, credential: Credential
) -> None:
    with miro_session(vault, credential.id) as miro, pytest.raises(ValueError, match="only"):
        miro.get("http://example.invalid/v2/boards/b1")
    assert sandbox.stats()["board_calls"] == 0


class _Recorder(BaseHTTPRequestHandler):
    """Notes each request's path and Authorization; redirects where ``redirects`` says."""

    server: _RecordingServer

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        target = self.server.redirects.get(self.path)
        self.send_response(302 if target else 200)
        if target:
            self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.seen: list[tuple[str, str | None]] = []
        self.redirects: dict[str, str] = {}
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def _recording() -> Iterator[_RecordingServer]:
    server = _RecordingServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def recorder() -> Iterator[_RecordingServer]:
    """Another host, which must never see the token."""
    with _recording() as server:
        yield server


@pytest.mark.parametrize("spelling", ["{other}/v2/boards/b1", "{miro}@{other_host}/v2/boards/b1"])
def test_a_prepared_request_for_another_host_is_refused_and_carries_no_token(
    sandbox: Sandbox,
    vault: Vault,
    credential: Credential,
    recorder: _RecordingServer,
    spelling: str,
) -> None:
    url = spelling.format(
        other=recorder.url, miro=sandbox.url, other_host=recorder.url.split("//")[1]
    )
    with miro_session(vault, credential.id) as miro:
        prepared = miro.prepare_request(requests.Request("GET", url))
        with pytest.raises(ValueError, match="only"):
            miro.send(prepared)
    assert recorder.seen == []
    assert vault.access_token(credential.id).reveal() not in str(prepared.headers)


def test_a_redirect_stays_on_miro_with_the_token_and_is_refused_elsewhere(
    env: dict[str, str], sandbox: Sandbox, redis_client: Any, recorder: _RecordingServer
) -> None:
    with _recording() as miro_host:
        vault = Vault.from_settings(Settings.from_env({**env, "MIRO_API_URL": miro_host.url}))
        credential = vault.import_response(sandbox.create_grants(1)[0])
        token = vault.access_token(credential.id).reveal()
        miro_host.redirects = {"/v2/a": "/v2/b", "/v2/c": f"{recorder.url}/v2/d"}
        with miro_session(vault, credential.id) as miro:
            assert miro.get("/v2/a").status_code == 200
            with pytest.raises(ValueError, match="only"):
                miro.get("/v2/c")

    bearer = f"Bearer {token}"
    assert miro_host.seen == [("/v2/a", bearer), ("/v2/b", bearer), ("/v2/c", bearer)]
    assert recorder.seen == []


def test_a_401_from_a_rotation_in_flight_is_retried_with_the_new_token(
    sandbox: Sandbox, vault: Vault, credential: Credential
) -> None:
    sandbox.set_faults(latency_ms=300)  # every Miro call takes 0.3 s
    rotation = threading.Thread(target=vault.rotate_now, args=(credential.id,))
    rotation.start()
    time.sleep(0.05)  # the board call leaves after the refresh and arrives after it rotated

    with miro_session(vault, credential.id) as miro:
        board = miro.get("/v2/boards/b1")
    rotation.join()

    assert board.status_code == 200
    stats = sandbox.stats()
    assert stats["stale_access_token_uses"] == 1 and stats["board_calls"] == 2


def test_a_401_with_the_token_still_current_is_returned_without_a_retry(
    sandbox: Sandbox, vault: Vault, credential: Credential
) -> None:
    sandbox.revoke_grant(credential.id.team_id, credential.id.user_id)  # the user uninstalls

    with miro_session(vault, credential.id) as miro:
        board = miro.get("/v2/boards/b1")

    assert board.status_code == 401
    assert sandbox.stats()["board_calls"] == 1


def test_twenty_threads_keep_calling_while_the_credential_is_force_rotated(
    sandbox: Sandbox, vault: Vault, credential: Credential
) -> None:
    """Every call succeeds, and no refresh token is ever presented twice."""
    sandbox.set_faults(latency_ms=20)  # calls overlap each rotation
    outcomes: Counter[int] = Counter()
    started: dict[int, float] = {}  # per thread: when its last successful call began
    tally = threading.Lock()
    stop = threading.Event()

    def call_until_stopped(worker: int) -> None:
        while not stop.is_set():
            began = time.monotonic()
            status = miro.get(f"/v2/boards/b{worker}").status_code
            with tally:
                outcomes[status] += 1
                if status == 200:
                    started[worker] = began

    def all_called_since(moment: float) -> bool:
        with tally:
            return len(started) == THREADS and min(started.values()) > moment

    with miro_session(vault, credential.id) as miro, ThreadPoolExecutor(THREADS) as pool:
        calls = [pool.submit(call_until_stopped, worker) for worker in range(THREADS)]
        try:
            wait_for(lambda: all_called_since(0), 10, "every thread to make a call")
            for _ in range(ROTATIONS):
                assert vault.rotate_now(credential.id).outcome == "rotated"
                # The next rotation waits until every thread made a call after this one, so
                # no retry is still in flight when it kills the token again.
                rotated_at = time.monotonic()
                wait_for(lambda at=rotated_at: all_called_since(at), 10, "calls after it")
        finally:
            stop.set()
        for call in calls:
            call.result()

    stats = sandbox.stats()
    assert outcomes[200] > 0 and set(outcomes) == {200}, outcomes
    assert stats["refreshes"] == ROTATIONS
    assert stats["reused_refresh_tokens"] == 0
    assert stats["stale_access_token_uses"] > 0  # calls did race the rotations, and recovered
    assert stats["board_calls"] == outcomes[200] + stats["stale_access_token_uses"]
    with requests.Session() as plain:
        token = vault.access_token(credential.id).reveal()
        answer = plain.get(
            f"{sandbox.url}/v2/boards/b1", headers={"Authorization": f"Bearer {token}"}
        )
    assert answer.status_code == 200
