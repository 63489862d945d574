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


def exchange(box: Sandbox, request: bytes) -> bytes:
    """Send raw bytes on a new connection; return all the sandbox sends until it hangs up."""
    address = urlsplit(box.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as raw:
        raw.sendall(request)
        raw.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := raw.recv(65536):
            received += chunk
    return received


def test_a_body_cut_short_ends_the_connection_without_a_traceback(
    box: Sandbox, capfd: pytest.CaptureFixture[str]
) -> None:
    box.set_faults(error_rate=1.0)  # answered before the form is read

    answer = exchange(box, b"POST /v1/oauth/token HTTP/1.1\r\nContent-Length: 5000\r\n\r\nabc")

    assert answer.startswith(b"HTTP/1.1 500 ")
    assert "Traceback" not in capfd.readouterr().err


def test_a_length_that_is_not_ascii_digits_is_answered(
    box: Sandbox, capfd: pytest.CaptureFixture[str]
) -> None:
    # Headers are read as Latin-1: this byte is "²", a digit to str.isdigit, not to int().
    answer = exchange(box, b"GET /_sandbox/stats HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 ")
    assert "Traceback" not in capfd.readouterr().err


def test_no_content_length_on_a_204_and_the_connection_header_says_what_happens(
    box: Sandbox,
) -> None:
    reset = exchange(box, b"POST /_sandbox/reset HTTP/1.1\r\nConnection: close\r\n\r\n")
    old_client = exchange(box, b"GET /_sandbox/stats HTTP/1.0\r\n\r\n")

    head, _, _ = reset.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204 ")
    assert b"content-length" not in head.lower()
    assert b"\r\nConnection: close" in head
    assert b"\r\nConnection: close" in old_client.partition(b"\r\n\r\n")[0]


def test_a_connection_accepted_as_the_sandbox_stops_is_cut_too() -> None:
    server = serving.SandboxServer("127.0.0.1", 0, lambda environ, start_response: [])
    ours, theirs = socket.socketpair()
    try:
        server.close_connections()
        server.track(ours)  # its handler started after the hang-up
        theirs.settimeout(5)
        assert theirs.recv(1) == b""
    finally:
        ours.close()
        theirs.close()
        server.server_close()
