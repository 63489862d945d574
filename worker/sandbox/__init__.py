"""A local stand-in for Miro's OAuth 2.0 server, with injectable faults.

It lets users try the token keeper without a Miro app, and lets tests and benchmarks
drive it through every failure Miro can produce. See ``server.Sandbox``.
"""

from worker.sandbox.faults import Faults
from worker.sandbox.server import DIALECTS, Sandbox, SandboxConfig

__all__ = ["DIALECTS", "Faults", "Sandbox", "SandboxConfig"]
