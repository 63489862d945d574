"""The sandbox's HTTP server: werkzeug's, with kept-alive connections and no access log.

Miro keeps connections alive, and the token keeper's client pools them. Werkzeug's
development server closes every connection after one answer, because it cannot tell where
a request body ends before the next request line. A sandbox that does so makes each call
cost a TCP handshake, a new server thread and a closed socket on both sides: in the
throughput benchmark that was half of the sandbox's CPU, taken from the same two cores as
the worker it measures. Here a request's body is read by its ``Content-Length`` and what the
application left unread is skipped, so the connection can carry the next request.

Nothing here logs a request line or a body: tokens travel in both.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable
from typing import IO, Any, cast

from werkzeug.exceptions import ClientDisconnected
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.wsgi import LimitedStream

#: Seconds an idle kept-alive connection is held open; Miro's edge closes sooner.
IDLE_TIMEOUT_S = 30.0


class SandboxServer(ThreadedWSGIServer):
    """A thread per connection, and every open connection known, so ``stop`` can cut them.

    A kept-alive connection outlives ``shutdown()``, which only stops accepting. Without
    ``close_connections`` a stopped sandbox would still answer clients that had connected
    before, and a test that stops Miro would not see it gone.
    """

    def __init__(self, host: str, port: int, app: Any) -> None:
        super().__init__(host, port, app, handler=_KeepAliveRequestHandler)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._closed = False

    def track(self, connection: socket.socket) -> None:
        """Know a new connection; one accepted just before ``close_connections`` is cut."""
        with self._connections_lock:
            if not self._closed:
                self._connections.add(connection)
                return
        _hang_up(connection)

    def forget(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """Hang up on every client, and on any whose handler starts later.

        Handler threads are not waited for: one serving a call cut short by ``stop`` ends
        when its write fails.
        """
        with self._connections_lock:
            self._closed = True
            connections = list(self._connections)
        for connection in connections:
            _hang_up(connection)


def _hang_up(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class _QuietRequestHandler(WSGIRequestHandler):
    """Request handler that writes no access log.

    Werkzeug logs each request line, and a request line can hold tokens in its query
    string (Miro accepts token parameters there). Errors are still reported, without
    their arguments, which may quote the request line.
    """

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Log nothing per request."""

    def log_error(self, format: str, *args: Any) -> None:
        """Report that a request failed at the HTTP level, without quoting it."""
        self.log("error", "malformed request rejected")

    def log_message(self, format: str, *args: Any) -> None:
        """Drop other messages; they may quote the request."""


class _KeepAliveRequestHandler(_QuietRequestHandler):
    """Serves HTTP/1.1 requests one after another on a connection, like Miro.

    A request whose body has no ``Content-Length`` (chunked, or ``Expect: 100-continue``)
    is left to werkzeug, which answers it and closes the connection.
    """

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server: SandboxServer

    def setup(self) -> None:
        super().setup()
        # An answer's headers and body are two writes; Nagle would hold the second back
        # until the client acknowledged the first, up to its delayed-ACK timer (40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection)

    def finish(self) -> None:
        self.server.forget(self.connection)
        super().finish()

    def log_error(self, format: str, *args: Any) -> None:
        """Say nothing when an idle connection times out: that is how keep-alive ends."""
        if args and isinstance(args[0], TimeoutError):
            return
        super().log_error(format, *args)

    def run_wsgi(self) -> None:
        length = _content_length(self.headers.get("Content-Length"))
        if length is None or self.headers.get("Transfer-Encoding") or self.headers.get("Expect"):
            super().run_wsgi()
            return
        self.environ = environ = self.make_environ()
        body = LimitedStream(cast(IO[bytes], self.rfile), length)
        environ["wsgi.input"] = body
        try:
            self._answer(environ)
            body.exhaust()
        except (ConnectionError, TimeoutError, ClientDisconnected) as exc:
            # ClientDisconnected: the body ended, or timed out, short of its Content-Length.
            self.connection_dropped(exc, environ)
            self.close_connection = True

    def _send_connection_header(self) -> None:
        """Say when the connection ends here, and confirm an HTTP/1.0 client's keep-alive.

        ``close_connection`` is set by the request: HTTP/1.0, or ``Connection: close``.
        """
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")

    def _answer(self, environ: dict[str, Any]) -> None:
        """Call the application and send its answer, with the length that delimits it."""
        started: list[Any] = []
        written: list[bytes] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started[:] = [status, headers]
            return written.append

        result: Iterable[bytes] = self.server.app(environ, start_response)
        try:
            written.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        content = b"".join(written)
        code, _, reason = status.partition(" ")
        self.send_response(int(code), reason)
        for name, value in headers:
            if name.lower() != "connection":
                self.send_header(name, value)
        if _has_body(int(code)) and not any(
            name.lower() == "content-length" for name, _ in headers
        ):
            self.send_header("Content-Length", str(len(content)))
        self._send_connection_header()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)
        self.wfile.flush()


def _content_length(value: str | None) -> int | None:
    """A request body's length, ``0`` when there is none; ``None`` if it is not a length."""
    if value is None:
        return 0
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _has_body(status: int) -> bool:
    """Whether an answer with this status carries a body, and so a ``Content-Length``."""
    return status >= 200 and status not in (204, 304)
