"""Run the Miro sandbox in the foreground until SIGINT or SIGTERM.

``python -m worker sandbox --port 8765 --client-id ID --client-secret SECRET`` (or
``python -m worker.sandbox ...``) prints the sandbox's base URL once, on a line of its own,
so a script can read where to point the token keeper.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from worker.sandbox.faults import Faults
from worker.sandbox.server import DIALECTS, Sandbox, SandboxConfig


def _parser(prog: str) -> argparse.ArgumentParser:
    """Describe the command line."""
    defaults = SandboxConfig(client_id="", client_secret="")
    parser = argparse.ArgumentParser(prog=prog, description="Serve a local Miro OAuth 2.0 sandbox.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on; 0 = any")
    parser.add_argument("--client-id", required=True, help="the app's client id")
    parser.add_argument("--client-secret", required=True, help="the app's client secret")
    parser.add_argument(
        "--access-ttl", type=int, default=defaults.access_ttl, help="access token lifetime, s"
    )
    parser.add_argument(
        "--refresh-ttl", type=int, default=defaults.refresh_ttl, help="refresh token lifetime, s"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay added to every Miro endpoint"
    )
    parser.add_argument(
        "--dialect",
        choices=DIALECTS,
        default=defaults.dialect,
        help="how refusals are worded; uniform: every refusal alike (POST /_sandbox/dialect "
        "changes it while running)",
    )
    return parser


def _stop_on_signals(stop: threading.Event) -> None:
    """Make SIGINT and SIGTERM set ``stop`` instead of killing the process mid-request."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)


def main(argv: Sequence[str] | None = None, prog: str = "python -m worker.sandbox") -> int:
    """Serve until told to stop; return the exit status.

    Args:
        argv: the options, ``sys.argv[1:]`` by default.
        prog: how the usage line names the command (``python -m worker sandbox`` too).
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    stop = threading.Event()
    # Before the URL is printed: whoever reads it may signal at once.
    _stop_on_signals(stop)
    try:
        config = SandboxConfig(
            client_id=args.client_id,
            client_secret=args.client_secret,
            access_ttl=args.access_ttl,
            refresh_ttl=args.refresh_ttl,
            dialect=args.dialect,
        )
        faults = Faults(latency_ms=args.latency_ms)
        sandbox = Sandbox(config, faults, host=args.host, port=args.port).start()
    except (OSError, TypeError, ValueError) as exc:
        parser.error(str(exc))
    try:
        print(sandbox.url, flush=True)
        stop.wait()
    finally:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
