"""Host names in routes and gateways, and which Service a host names.

Tessera has one namespace per trust domain, and a ``Service`` is named by a DNS label
(``users-service``). A destination host names a Service in one of three spellings, the
namespace part kept as written but not used to find the Service:

- ``users-service``
- ``users-service.<namespace>.svc``
- ``users-service.<namespace>.svc.cluster.local`` (Istio's fully qualified form)

Any other name (``api.example.com``, ``users-service.default``) names no Service:
Tessera routes only to the Services it knows (there is no ``ServiceEntry``).

The hosts a ``VirtualService`` answers for (``spec.hosts``) and those a ``Gateway``
server accepts (``servers[].hosts``) may also be ``*`` or ``*.example.com``. A Gateway
host may carry Istio's namespace prefix (``./api.example.com``,
``*/api.example.com``, ``prod/api.example.com``); it is accepted and has no effect.

Usage::

    service_name("users-service.default.svc.cluster.local")   # "users-service"
    service_name("api.example.com")                            # None
    hosts_overlap("*.example.com", "api.example.com")          # True
"""

from __future__ import annotations

from mesh.names import is_dns_label, is_dns_subdomain

__all__ = [
    "MESH_GATEWAY",
    "check_authority",
    "check_destination_host",
    "check_gateway_host",
    "check_gateway_reference",
    "check_route_host",
    "gateway_name",
    "hosts_overlap",
    "service_name",
    "strip_namespace",
]

MESH_GATEWAY = "mesh"
"""The reserved gateway name for the sidecars of the mesh (Istio's)."""

_CLUSTER_SUFFIXES = (".svc", ".svc.cluster.local")


def service_name(host: str) -> str | None:
    """The name of the Service ``host`` names, or None if it cannot name one."""
    if is_dns_label(host):
        return host
    for suffix in _CLUSTER_SUFFIXES:
        if host.endswith(suffix):
            parts = host[: -len(suffix)].split(".")
            if len(parts) == 2 and all(is_dns_label(part) for part in parts):
                return parts[0]
    return None


def check_destination_host(host: str) -> None:
    """A destination host: a DNS name, never a wildcard."""
    if "*" in host:
        raise ValueError("must name a Service; a destination cannot be a wildcard")
    if not is_dns_subdomain(host):
        raise ValueError(
            "must be a Service's name (users-service) or its fully qualified name "
            "(users-service.default.svc.cluster.local)"
        )


def check_route_host(host: str) -> None:
    """A host a route answers for: ``*``, ``*.example.com`` or a DNS name, lower case."""
    if host == "*":
        return
    name = host[2:] if host.startswith("*.") else host
    if "*" in name or not is_dns_subdomain(name):
        raise ValueError(
            "must be a lower-case DNS name (reviews, api.example.com), a wildcard "
            "'*.example.com' or '*'"
        )


def strip_namespace(host: str) -> str:
    """A Gateway host without Istio's ``namespace/`` prefix."""
    return host.rpartition("/")[2]


def check_gateway_host(host: str) -> None:
    """A Gateway server's host, with an optional ``namespace/`` prefix (ignored)."""
    namespace, slash, name = host.rpartition("/")
    if slash and not (namespace in ("*", ".") or is_dns_label(namespace)):
        raise ValueError(
            "must be a host with an optional namespace prefix ('./', '*/' or a DNS "
            "label and '/'), e.g. api.example.com"
        )
    check_route_host(name)


def gateway_name(reference: str) -> str:
    """The Gateway a VirtualService's ``gateways`` entry names (``ns/name`` → ``name``)."""
    return reference.rpartition("/")[2]


def check_gateway_reference(reference: str) -> None:
    """``mesh``, a Gateway's name, or ``namespace/name``."""
    namespace, slash, name = reference.rpartition("/")
    if (slash and not is_dns_label(namespace)) or not is_dns_subdomain(name):
        raise ValueError(
            f"must be '{MESH_GATEWAY}' or the name of a Gateway (optionally 'namespace/name')"
        )


def hosts_overlap(first: str, second: str) -> bool:
    """Whether some request host matches both patterns (``*``, ``*.suffix``, exact)."""
    if first == "*" or second == "*":
        return True
    first_wild, second_wild = first.startswith("*."), second.startswith("*.")
    if first_wild and second_wild:
        return first[1:].endswith(second[1:]) or second[1:].endswith(first[1:])
    if first_wild:
        return second.endswith(first[1:])
    if second_wild:
        return first.endswith(second[1:])
    return first == second


def check_authority(authority: str) -> None:
    """A ``Host`` header value to set: a DNS name, optionally with ``:port``."""
    host, colon, port = authority.partition(":")
    if not is_dns_subdomain(host) or (
        colon and not (port.isdigit() and 0 < int(port) < 65536 and port[0] != "0")
    ):
        raise ValueError(
            "must be a lower-case DNS name with an optional port, e.g. api.example.com:8080"
        )
