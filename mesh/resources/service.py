"""``Service`` (tessera.io): a service of the mesh, who may serve it, and its ports.

Istio derives this from Kubernetes; Tessera has it explicit. Fields:

- metadata.name: a DNS-1123 label (``users-service``), the name hosts resolve to
  (:mod:`mesh.hosts`)
- spec.spiffeIds: the SPIFFE IDs whose workloads may register instances (exact IDs);
  a caller's sidecar requires the upstream's certificate to carry one of them
- spec.ports[]: ``number``, ``protocol`` (HTTP, HTTP2, GRPC, TCP), ``name``
- spec.healthCheck: ``http.path`` or ``tcp: {}``, ``interval``, ``timeout``: run by
  the agent against the app of each instance

Example::

    apiVersion: tessera.io/v1alpha1
    kind: Service
    metadata: {name: users-service}
    spec:
      spiffeIds: [spiffe://example.org/users]
      ports: [{number: 80, name: http, protocol: HTTP}]
      healthCheck: {http: {path: /healthz}, interval: 2s}
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import AfterValidator, model_validator

from mesh.fields import DnsLabel, Duration, Model, Path, PortNumber, SpiffeId, nonempty, unique
from mesh.resources.base import ObjectMeta, Resource

__all__ = [
    "HTTPHealthCheck",
    "HealthCheck",
    "Service",
    "ServiceMeta",
    "ServicePort",
    "ServiceSpec",
    "TCPHealthCheck",
]


class ServicePort(Model):
    number: PortNumber
    protocol: Literal["HTTP", "HTTP2", "GRPC", "TCP"]
    name: DnsLabel | None = None


class HTTPHealthCheck(Model):
    path: Path


class TCPHealthCheck(Model):
    """A connection that opens is healthy."""


class HealthCheck(Model):
    http: HTTPHealthCheck | None = None
    tcp: TCPHealthCheck | None = None
    interval: Duration | None = None
    timeout: Duration | None = None

    @model_validator(mode="after")
    def _check_one(self) -> Self:
        if self.http is None and self.tcp is None:
            raise ValueError("must set http or tcp")
        if self.http is not None and self.tcp is not None:
            raise ValueError("must set http or tcp, not both")
        return self


def _check_ports(ports: tuple[ServicePort, ...]) -> tuple[ServicePort, ...]:
    numbers: set[int] = set()
    names: set[str] = set()
    for port in ports:
        if port.number in numbers:
            raise ValueError(f"has port {port.number} twice")
        numbers.add(port.number)
        if port.name is not None:
            if port.name in names:
                raise ValueError(f"has two ports named {port.name}")
            names.add(port.name)
    return ports


class ServiceSpec(Model):
    spiffe_ids: Annotated[tuple[SpiffeId, ...], nonempty, unique]
    ports: Annotated[tuple[ServicePort, ...], nonempty, AfterValidator(_check_ports)]
    health_check: HealthCheck | None = None


class ServiceMeta(ObjectMeta):
    name: DnsLabel  # hosts resolve to it, so no '.'


class Service(Resource):
    """A service: the workloads that may serve it and the ports they serve on."""

    GROUP: ClassVar[str] = "tessera.io"
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1alpha1",)
    KIND: ClassVar[str] = "Service"

    kind: Literal["Service"]
    metadata: ServiceMeta
    spec: ServiceSpec

    def port(self, number: int) -> ServicePort | None:
        return next((port for port in self.spec.ports if port.number == number), None)
