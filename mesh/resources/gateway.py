"""``Gateway`` (networking.istio.io): the ports a ``tessera gateway`` listens on.

Tessera's subset of Istio's fields (everything else is refused by name):

- spec: ``selector`` (required: the ``--label``s of the gateways that serve it),
  ``servers``
- servers[]: ``port`` (``number``, ``protocol`` HTTP or HTTPS, ``name``), ``hosts``,
  ``tls``, ``name``
- tls: ``mode`` (SIMPLE), ``serverCertificate``, ``privateKey`` (absolute paths on the
  gateway's host) on an HTTPS server; ``httpsRedirect`` on an HTTP server

Example::

    apiVersion: networking.istio.io/v1
    kind: Gateway
    metadata: {name: microservice-gateway}
    spec:
      selector: {istio: ingressgateway}
      servers:
      - port: {number: 80, name: http, protocol: HTTP}
        hosts: ["*"]

A selector is required: without one, every gateway of the trust domain would serve it.
Istio's ``credentialName`` names a Kubernetes secret, which Tessera does not have: give
the certificate and key files instead.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import AfterValidator, model_validator

from mesh.fields import (
    FilePath,
    Flag,
    GatewayHost,
    Labels,
    Model,
    PortNumber,
    Text,
    nonempty,
    unique,
)
from mesh.resources.base import Resource

__all__ = [
    "Gateway",
    "GatewayPort",
    "GatewaySpec",
    "Server",
    "ServerTLSSettings",
]


class GatewayPort(Model):
    number: PortNumber
    protocol: Literal["HTTP", "HTTPS"]
    name: Text | None = None


class ServerTLSSettings(Model):
    https_redirect: Flag | None = None
    mode: Literal["SIMPLE"] | None = None
    server_certificate: FilePath | None = None
    private_key: FilePath | None = None


class Server(Model):
    port: GatewayPort
    hosts: Annotated[tuple[GatewayHost, ...], nonempty, unique]
    tls: ServerTLSSettings | None = None
    name: Text | None = None

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        tls = self.tls
        if self.port.protocol == "HTTPS":
            missing = [
                alias
                for alias, value in (
                    ("mode: SIMPLE", tls and tls.mode),
                    ("serverCertificate", tls and tls.server_certificate),
                    ("privateKey", tls and tls.private_key),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"must have tls with {', '.join(missing)} for protocol HTTPS")
            if tls is not None and tls.https_redirect is not None:
                raise ValueError(
                    "cannot have tls.httpsRedirect on an HTTPS server (it belongs on the "
                    "HTTP server that sends callers to this one)"
                )
        elif tls is not None and (tls.mode or tls.server_certificate or tls.private_key):
            raise ValueError(
                "cannot have tls.mode, serverCertificate or privateKey with protocol HTTP "
                "(use protocol HTTPS); an HTTP server's tls may only set httpsRedirect"
            )
        return self


def _check_servers(servers: tuple[Server, ...]) -> tuple[Server, ...]:
    protocols: dict[int, str] = {}
    names: set[str] = set()
    for server in servers:
        number, protocol = server.port.number, server.port.protocol
        if protocols.setdefault(number, protocol) != protocol:
            raise ValueError(f"has port {number} as both {protocols[number]} and {protocol}")
        if server.name is not None:
            if server.name in names:
                raise ValueError(f"has two servers named {server.name!r}")
            names.add(server.name)
    return servers


class GatewaySpec(Model):
    selector: Annotated[Labels, nonempty]
    servers: Annotated[tuple[Server, ...], nonempty, AfterValidator(_check_servers)]


class Gateway(Resource):
    """Servers (port, protocol, hosts, TLS) for the gateways whose labels match."""

    GROUP: ClassVar[str] = "networking.istio.io"
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1", "v1beta1", "v1alpha3")
    KIND: ClassVar[str] = "Gateway"

    kind: Literal["Gateway"]
    spec: GatewaySpec
