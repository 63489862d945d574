"""The sandbox's HTTP layer: connections kept alive as Miro keeps them, and cut when it stops.

Each test drives a real sandbox over one ``http.client`` connection, so it can tell whether
the next request went over the same socket.
"""

from __future__ import annotations

import http.client
import json
import logging
import secrets
import socket
from collections.abc import Iterator
from urllib.parse import urlencode, urlsplit

import pytest

from worker.sandbox import Sandbox, SandboxConfig, serving

CLIENT_ID = "3458764500000000042"
CLIENT_SECRET = secrets.token_urlsafe(24)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)) as running:
        yield running


@pytest.fixture
def connection(box: Sandbox) -> Iterator[http.client.HTTPConnection]:
    address = urlsplit(box.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=5)
    yield connection
    connection.close()


def refresh(connection: http.client.HTTPConnection, refresh_token: str) -> dict[str, object]:
    """One refresh over ``connection``; the answer must leave the connection open."""
    form = {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": refresh_token,
    }
    connection.request("POST", "/v1/oauth/token", urlencode(form), FORM)
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 200, answer
    assert not response.will_close
    return answer


def test_token_calls_follow_one_another_on_one_connection(
    box: Sandbox, connection: http.client.HTTPConnection
) -> None:
    token = str(box.create_grants(1)[0]["refresh_token"])
    token = str(refresh(connection, token)["refresh_token"])
    first_socket = connection.sock

    for _ in range(3):
        token = str(refresh(connection, token)["refresh_token"])

    assert connection.sock is first_socket
    assert box.stats()["refreshes"] == 4


def test_a_body_the_endpoint_never_read_does_not_become_the_next_request(
    box: Sandbox, connection: http.client.HTTPConnection
) -> None:
    token = str(box.create_grants(1)[0]["refresh_token"])
    box.set_faults(error_rate=1.0)  # answered before the form is read
    connection.request("POST", "/v1/oauth/token", "x" * 5000, FORM)
    response = connection.getresponse()
    response.read()
    assert response.status == 500
    box.set_faults(error_rate=0.0)

    refresh(connection, token)

    assert box.stats()["refreshes"] == 1


def test_a_chunked_request_is_answered_and_its_connection_closed(
    box: Sandbox, connection: http.client.HTTPConnection
) -> None:
    connection.request("GET", "/_sandbox/stats", body=iter([b"{}"]), encode_chunked=True)
    response = connection.getresponse()

    assert response.status == 200
    assert json.loads(response.read())["refreshes"] == 0
    assert response.will_close


def test_a_stopped_sandbox_answers_no_one_who_connected_before(
    box: Sandbox, connection: http.client.HTTPConnection
) -> None:
    token = str(box.create_grants(1)[0]["refresh_token"])
    token = str(refresh(connection, token)["refresh_token"])

    box.stop()

    with pytest.raises((http.client.HTTPException, ConnectionError, socket.timeout)):
        refresh(connection, token)


def test_an_idle_connection_is_closed_quietly(
    box: Sandbox,
    connection: http.client.HTTPConnection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(serving._KeepAliveRequestHandler, "timeout", 0.2)
    token = str(box.create_grants(1)[0]["refresh_token"])
    refresh(connection, token)
    assert connection.sock is not None

    connection.sock.settimeout(5)
    assert connection.sock.recv(1) == b""  # the sandbox hung up

    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
