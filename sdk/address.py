"""A ``HOST:PORT`` to listen on or connect to, read the same way everywhere.

    HostPort.parse("127.0.0.1:8081")                   # HostPort(host='127.0.0.1', port=8081)
    HostPort.parse("[::1]:8443")                       # an IPv6 address goes in brackets
    HostPort.parse("0.0.0.0:0", any_port=True)         # port 0: any free port (to bind on)
    HostPort.parse("8081", what="--bind", example="127.0.0.1:8081")
    # ConfigError: --bind '8081' is not HOST:PORT, e.g. 127.0.0.1:8081
    str(HostPort("::1", 8443))                         # '[::1]:8443'

The port is 1 to 65535 (0 too with ``any_port``); an IPv6 address needs its
brackets, since in ``::1:8443`` the port cannot be told from the address. The
error names the setting (``what``) and shows an ``example``, so each caller's
message says which flag or key to fix.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from dataclasses import dataclass
from typing import Final, Self

from sdk.errors import ConfigError

__all__ = ["HostPort", "unused_port"]

MAX_PORT: Final = 65535


@dataclass(frozen=True)
class HostPort:
    """A ``HOST:PORT`` to listen on or connect to; ``host`` is kept without brackets."""

    host: str
    port: int

    @classmethod
    def parse(
        cls,
        text: object,
        *,
        what: str = "address",
        example: str = "127.0.0.1:8081",
        any_port: bool = False,
    ) -> Self:
        """``HOST:PORT`` or ``[IPV6]:PORT``, blanks around it ignored; ConfigError
        ``"<what> <text!r> is not HOST:PORT, e.g. <example>"`` otherwise."""
        parsed = _split(text.strip(), any_port=any_port) if isinstance(text, str) else None
        if parsed is None:
            raise ConfigError(f"{what} {text!r} is not HOST:PORT, e.g. {example}")
        return cls(*parsed)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        """Whether the host is an IP address (not a name to resolve)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def _split(text: str, *, any_port: bool) -> tuple[str, int] | None:
    host, colon, port_text = text.rpartition(":")
    if not colon or not (port_text.isascii() and port_text.isdigit()):
        return None
    port = int(port_text)
    if not (0 if any_port else 1) <= port <= MAX_PORT:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        return (host, port) if _is_ipv6(host) else None
    if not host or any(char in host for char in ":[]"):
        return None
    return host, port


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


UNUSED_PORTS: Final = range(20000, 32768)
"""Where :func:`unused_port` looks: below Linux's ephemeral range (32768-60999), which the
kernel hands to outgoing connections at any moment."""


_HANDED_OUT: set[int] = set()
"""Ports :func:`unused_port` gave this process already: none is given twice, since the
first may not be listened on yet when the second is asked for."""


def unused_port(host: str = "127.0.0.1", *, attempts: int = 100) -> int:
    """A TCP port of ``host`` nothing is bound to now, for a process to listen on a little
    later (a demo's proxies, a test's): picked at random outside the ephemeral range, so
    that no outgoing connection takes it meanwhile, as one may take a ``bind(0)`` port,
    and never one this process was given before."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(attempts):
        port = random.choice(UNUSED_PORTS)
        if port in _HANDED_OUT:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            if len(_HANDED_OUT) >= len(UNUSED_PORTS) // 2:  # a long-lived process: start over
                _HANDED_OUT.clear()
            _HANDED_OUT.add(port)
            return port
    raise ConfigError(f"no unused port on {host} after {attempts} tries")
