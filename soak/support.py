"""Small helpers shared by the soak, the benchmarks and the tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

POLL_INTERVAL = 0.02


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, message: str = "") -> Any:
    """Poll ``condition`` until it is truthy and return its value.

    Raises:
        TimeoutError: at the deadline, naming what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {message or condition}")
        time.sleep(POLL_INTERVAL)
