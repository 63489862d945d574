"""Which ``Host`` a server answers: its own names only, so DNS rebinding cannot reach it.

A page on an attacker's domain whose DNS answer then switches to 127.0.0.1 (DNS rebinding)
is, to the browser, of the same origin as a server on loopback: it can read that server's
pages and send its forms. Its requests still carry the attacker's name in ``Host``, so a
server that refuses every name but its own is out of the page's reach. The port is not
compared: it is not what a rebinding attacker needs to forge.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

#: The names of this machine that no other machine's page can take on.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

_HOST = re.compile(
    r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_.-]+))(?::[0-9]{1,5})?",
    re.ASCII | re.IGNORECASE,
)


def host_name(host: str) -> str | None:
    """The name in a ``Host`` value, comparable with another: lowercase, no port or brackets.

    ``"Example.COM:5000"`` gives ``"example.com"``, ``"[::1]:5000"`` and ``"::1"`` give
    ``"::1"``; anything that is not a host name or address gives ``None``.
    """
    address = _ip_address(host)
    if address is not None:
        return address.compressed
    match = _HOST.fullmatch(host)
    if match is None:
        return None
    if match["ipv6"]:
        try:
            return ipaddress.IPv6Address(match["ipv6"]).compressed
        except ValueError:
            return None
    return match["name"].lower().removesuffix(".") or None


@dataclass(frozen=True)
class HostAllowlist:
    """The host names a server answers to."""

    names: frozenset[str]

    @classmethod
    def serving(cls, address: str, also: Iterable[str] = ()) -> HostAllowlist:
        """The names of a server listening on ``address``, plus the names in ``also``.

        A loopback or wildcard address adds the loopback names, by which a browser on the same
        machine reaches it; a wildcard address (``0.0.0.0``, ``::``) is no name itself.
        """
        names = {name for name in map(host_name, also) if name}
        listening = host_name(address) or ""
        ip = _ip_address(listening)
        wildcard = not listening or (ip is not None and ip.is_unspecified)
        if wildcard or listening in LOOPBACK_NAMES or (ip is not None and ip.is_loopback):
            names |= LOOPBACK_NAMES
        if not wildcard:
            names.add(listening)
        return cls(frozenset(names))

    def allows(self, host: str | None) -> bool:
        """Whether a request whose ``Host`` is ``host`` is for this server."""
        return host is not None and host_name(host) in self.names


def _ip_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None
