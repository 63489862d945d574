"""A TCP relay in front of Redis that can lose one reply: the command lands, its answer never comes.

That is what a client sees when a connection drops between Redis running a write and the
reply reaching it; the relay makes that moment exact instead of hoping a timeout hits it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Self

CHUNK = 65536


class ReplyDroppingRelay:
    """Forwards connections to ``127.0.0.1:target_port`` on a port of its own.

    After :meth:`drop_reply_to` is given some bytes, the next request that contains them is
    forwarded, and the connection that sent it is closed as soon as Redis answers, without
    the answer (after running ``then``, if given). Every other byte passes untouched.
    """

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._armed: bytes | None = None
        self._then: Callable[[], object] = lambda: None
        self._lock = threading.Lock()
        self.dropped = threading.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"

    def start(self) -> Self:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        self._listener.close()

    def drop_reply_to(self, marker: bytes, then: Callable[[], object] = lambda: None) -> None:
        """Lose the reply to the next request holding ``marker``.

        Args:
            marker: bytes of the request, such as the script's SHA-1.
            then: what happens between the request landing and its client learning that the
                connection dropped (another client's write, before the request is resent).
        """
        with self._lock:
            self._armed = marker
            self._then = then

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target)
            marked = threading.Event()
            threading.Thread(
                target=self._requests, args=(client, upstream, marked), daemon=True
            ).start()
            threading.Thread(
                target=self._replies, args=(upstream, client, marked), daemon=True
            ).start()

    def _requests(
        self, client: socket.socket, upstream: socket.socket, marked: threading.Event
    ) -> None:
        while data := _receive(client):
            with self._lock:
                if self._armed is not None and self._armed in data:
                    self._armed = None
                    marked.set()
            upstream.sendall(data)
        _close(upstream)

    def _replies(
        self, upstream: socket.socket, client: socket.socket, marked: threading.Event
    ) -> None:
        while data := _receive(upstream):
            if marked.is_set():
                self._then()
                self.dropped.set()
                break
            client.sendall(data)
        _close(client)


def _receive(connection: socket.socket) -> bytes:
    try:
        return connection.recv(CHUNK)
    except OSError:
        return b""


def _close(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()
