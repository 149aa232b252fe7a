"""The address an instance is registered with: where callers reach its inbound listener.

::

    advertised_address(HostPort("10.0.0.5", 15006))  # HostPort("10.0.0.5", 15006): as it is
    advertised_address(HostPort("0.0.0.0", 15006))   # this host's address, port 15006

A listener on one address is reached there. A listener on every address (``0.0.0.0``,
``::``) is reached at this host's address, which is

1. ``$TESSERA_ADVERTISE_ADDRESS`` when set: a host name or IP address, no port (for a
   host behind NAT, or with several networks where the default one is not the mesh's);
2. else the address of the interface the default route leaves by, the one other hosts
   most likely reach: the kernel's choice of source address for a UDP socket
   "connected" to a documentation address (RFC 5737/3849), which sends nothing.

A host with no route to anywhere has no such address: :class:`AdvertiseError` says to
set the variable or listen on one address with ``--inbound``, rather than registering an
address other hosts could not reach.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from typing import Final

from sdk.address import HostPort
from sdk.errors import ConfigError

__all__ = ["ADVERTISE_ADDRESS_ENV", "AdvertiseError", "advertised_address"]

ADVERTISE_ADDRESS_ENV: Final = "TESSERA_ADVERTISE_ADDRESS"
# Addresses reserved for documentation: nothing answers there, and a UDP connect sends nothing.
_PROBES: Final = {
    socket.AF_INET: ("192.0.2.1", 9),
    socket.AF_INET6: ("2001:db8::1", 9),
}
_MAX_NAME: Final = 253
_HOST_NAME: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                               r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


class AdvertiseError(ConfigError):
    """This host's address cannot be told."""


def advertised_address(
    listening: HostPort, *, environ: Mapping[str, str] | None = None
) -> HostPort:
    """Where callers reach a listener on ``listening`` (its port as bound)."""
    if not _is_wildcard(listening.host):
        return listening
    environ = os.environ if environ is None else environ
    given = environ.get(ADVERTISE_ADDRESS_ENV, "").strip()
    if given:
        return HostPort(_advertised_host(given), listening.port)
    families = (socket.AF_INET6, socket.AF_INET) if ":" in listening.host else (socket.AF_INET,)
    for family in families:
        host = _default_route_address(family)
        if host is not None:
            return HostPort(host, listening.port)
    raise AdvertiseError(
        f"--inbound {listening} listens on every address, and this host has no default "
        f"route to tell its own by; set {ADVERTISE_ADDRESS_ENV} to the address other hosts "
        "reach it at, or listen on that address with --inbound HOST:PORT"
    )


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _advertised_host(text: str) -> str:
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        reachable = not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        reachable = len(host) <= _MAX_NAME and _HOST_NAME.fullmatch(host) is not None
    if not reachable:
        raise AdvertiseError(
            f"{ADVERTISE_ADDRESS_ENV}={text!r} is not an address other hosts can reach: give "
            "this host's name or IP address, without a port, e.g. 10.0.0.5"
        )
    return host


def _default_route_address(family: socket.AddressFamily) -> str | None:
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(_PROBES[family])
            host = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if _is_wildcard(host) else host
