"""The web app's HTTP server: tornado reads each request whole, then a thread answers it.

Connections wait in tornado's event loop until their request has fully arrived; only then is
the Flask app called, on a pool of threads. A client that opens a connection and sends half
a request line, or nothing, costs a socket and no thread, so no number of them can keep
``/healthz`` or the OAuth callback from answering. (gunicorn's threaded worker gave each
connection a thread before its request line was complete: sixteen idle clients froze it.)

No access log: the callback's query string holds an authorization code and a state.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from flask import Flask
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPServerRequest
from tornado.wsgi import WSGIContainer

#: Largest request body read: the app's forms hold an id and a token.
MAX_BODY_BYTES = 64 * 1024
#: Seconds a connection may take to send a request's headers, or its body, before it is cut.
REQUEST_TIMEOUT_S = 60.0


class _CountedContainer(WSGIContainer):
    """tornado's WSGI adapter, counting the requests it is answering so a stop can wait."""

    def __init__(self, app: Flask, executor: ThreadPoolExecutor) -> None:
        super().__init__(app, executor)
        self._answering = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def handle_request(self, request: HTTPServerRequest) -> None:
        self._answering += 1
        self._idle.clear()
        try:
            await super().handle_request(request)
        finally:
            self._answering -= 1
            if not self._answering:
                self._idle.set()

    async def idle(self) -> None:
        """Return once no request is being answered."""
        await self._idle.wait()


def serve(app: Flask, address: str, port: int, threads: int) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then finish the requests being answered.

    Raises:
        OSError: the address cannot be listened on.
    """
    _quiet_tornado()
    asyncio.run(_serve(app, address, port, threads))


def _quiet_tornado() -> None:
    """Silence tornado's lines that quote a request: its URL, or its header values."""
    logging.getLogger("tornado.access").disabled = True  # the URL, query string included
    logging.getLogger("tornado.general").setLevel(logging.WARNING)  # at INFO: bad headers


async def _serve(app: Flask, address: str, port: int, threads: int) -> None:
    with ThreadPoolExecutor(threads, thread_name_prefix="web") as executor:
        container = _CountedContainer(app, executor)
        server = HTTPServer(
            container,
            max_body_size=MAX_BODY_BYTES,
            idle_connection_timeout=REQUEST_TIMEOUT_S,
            body_timeout=REQUEST_TIMEOUT_S,
        )
        server.listen(port, address)
        host = f"[{address}]" if ":" in address else address
        print(f"Serving the web page on http://{host}:{port}", flush=True)
        await _stop_signal()
        server.stop()
        await container.idle()
        await server.close_all_connections()


async def _stop_signal() -> None:
    """Return at the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
