"""What one resource says about others, checked over a whole configuration.

Run on the configuration an apply would leave (not on the input alone: a VirtualService
may name a Service applied last week). Each error has the path of the field that refers
to something missing::

    errors = check_references(resources)
    # VirtualService reviews: spec.http[0].route[1].destination.subset: subset v3 is not
    #   defined by any DestinationRule for host reviews

The checks:

- a VirtualService's ``gateways`` name ``mesh`` or a Gateway, and each named Gateway
  serves at least one of its hosts;
- a VirtualService for the mesh (no ``gateways``, or ``mesh`` among them) names a
  Service by each host that is not a wildcard (the sidecars route calls by Service);
- no two VirtualServices route the same host on the same gateway (merging them would
  make the order of their routes depend on their names);
- a route's and a mirror's ``destination``: its host names a Service
  (:func:`mesh.hosts.service_name`), its ``port`` is one of the Service's ports (and
  is given when the Service has several), its ``subset`` is defined by the
  DestinationRule for that Service;
- a DestinationRule's host names a Service, and no other DestinationRule has it;
- a RateLimit's ``service`` exists;
- no kind and name twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from mesh.errors import FieldError
from mesh.hosts import MESH_GATEWAY, gateway_name, hosts_overlap, service_name, strip_namespace
from mesh.resources import (
    DestinationRule,
    Gateway,
    RateLimit,
    Resource,
    ResourceKey,
    Service,
    VirtualService,
    sort_key,
)
from mesh.resources.virtualservice import Destination

__all__ = [
    "check_references",
]

_ErrorMaker = Callable[[str, str], FieldError]


def check_references(resources: Iterable[Resource]) -> list[FieldError]:
    """Every reference in ``resources`` to something that is not among them."""
    ordered = sorted(resources, key=sort_key)
    index = _Index(ordered)
    errors: list[FieldError] = list(index.duplicates)
    for resource in index.unique:
        if isinstance(resource, VirtualService):
            errors.extend(_virtual_service(resource, index))
        elif isinstance(resource, DestinationRule):
            errors.extend(_destination_rule(resource, index))
        elif isinstance(resource, RateLimit):
            errors.extend(_rate_limit(resource, index))
    return errors


class _Index:
    """The resources by kind and name, and what the checks look up often."""

    def __init__(self, ordered: list[Resource]) -> None:
        self.gateways: dict[str, Gateway] = {}
        self.services: dict[str, Service] = {}
        self.destination_rules: dict[str, DestinationRule] = {}  # by Service name: the first
        self.duplicates: list[FieldError] = []
        self.unique: list[Resource] = []
        self.routed: dict[tuple[str, str], str] = {}  # (gateway, host) -> VirtualService
        seen: set[ResourceKey] = set()
        for resource in ordered:
            if resource.key in seen:
                self.duplicates.append(
                    FieldError(resource.KIND, resource.name, "", "is defined twice")
                )
                continue
            seen.add(resource.key)
            self.unique.append(resource)
            if isinstance(resource, Gateway):
                self.gateways[resource.name] = resource
            elif isinstance(resource, Service):
                self.services[resource.name] = resource
        for resource in self.unique:
            if isinstance(resource, DestinationRule):
                name = service_name(resource.spec.host)
                if name is not None:
                    self.destination_rules.setdefault(name, resource)

    def service(self, host: str) -> Service | None:
        name = service_name(host)
        return self.services.get(name) if name is not None else None

    def subsets(self, service: str) -> set[str]:
        rule = self.destination_rules.get(service)
        if rule is None or rule.spec.subsets is None:
            return set()
        return {subset.name for subset in rule.spec.subsets}


def _missing_host(host: str) -> str:
    name = service_name(host)
    if name is not None and name != host:
        return f"host {host} names no Service (it would be Service {name})"
    return f"host {host} names no Service"


def _virtual_service(resource: VirtualService, index: _Index) -> Iterator[FieldError]:
    def error(path: str, message: str) -> FieldError:
        return FieldError(resource.KIND, resource.name, path, message)

    spec = resource.spec
    for position, reference in enumerate(spec.gateways or ()):
        name = gateway_name(reference)
        if name == MESH_GATEWAY:
            continue
        gateway = index.gateways.get(name)
        if gateway is None:
            yield error(f"spec.gateways[{position}]", f"Gateway {name} does not exist")
            continue
        served = [strip_namespace(host) for server in gateway.spec.servers for host in server.hosts]
        if not any(hosts_overlap(host, other) for host in spec.hosts for other in served):
            yield error(
                f"spec.gateways[{position}]",
                f"Gateway {name} serves none of this VirtualService's hosts (it serves "
                f"{', '.join(dict.fromkeys(served))})",
            )

    gateways = resource.gateway_names
    for position, host in enumerate(spec.hosts):
        if MESH_GATEWAY in gateways and "*" not in host and index.service(host) is None:
            yield error(
                f"spec.hosts[{position}]",
                f"{_missing_host(host)}; a VirtualService for the mesh routes the calls "
                "made to a Service (to route a gateway's requests, name the gateway in "
                "spec.gateways)",
            )
        for on_gateway in gateways:
            claim = (on_gateway, service_name(host) or host)
            owner = index.routed.setdefault(claim, resource.name)
            if owner != resource.name:
                yield error(
                    f"spec.hosts[{position}]",
                    f"host {host} on gateway {on_gateway} is already routed by VirtualService "
                    f"{owner}: put the routes of one host in one VirtualService",
                )

    for position, route in enumerate(spec.http):
        for number, destination in enumerate(route.route or ()):
            yield from _destination(
                destination.destination,
                f"spec.http[{position}].route[{number}].destination",
                index,
                error,
            )
        if route.mirror is not None:
            yield from _destination(route.mirror, f"spec.http[{position}].mirror", index, error)


def _destination(
    destination: Destination, path: str, index: _Index, error: _ErrorMaker
) -> Iterator[FieldError]:
    service = index.service(destination.host)
    if service is None:
        yield error(f"{path}.host", _missing_host(destination.host))
        return
    ports = ", ".join(str(port.number) for port in service.spec.ports)
    if destination.port is not None:
        if service.port(destination.port.number) is None:
            yield error(
                f"{path}.port.number",
                f"port {destination.port.number} is not a port of Service {service.name} "
                f"(its ports: {ports})",
            )
    elif len(service.spec.ports) > 1:
        yield error(
            f"{path}.port",
            f"is required: Service {service.name} has several ports ({ports})",
        )
    if destination.subset is not None and destination.subset not in index.subsets(service.name):
        yield error(
            f"{path}.subset",
            f"subset {destination.subset} is not defined by any DestinationRule for host "
            f"{destination.host}",
        )


def _destination_rule(resource: DestinationRule, index: _Index) -> Iterator[FieldError]:
    host = resource.spec.host
    service = index.service(host)
    if service is None:
        yield FieldError(resource.KIND, resource.name, "spec.host", _missing_host(host))
        return
    first = index.destination_rules[service.name]
    if first.name != resource.name:
        yield FieldError(
            resource.KIND,
            resource.name,
            "spec.host",
            f"Service {service.name} already has DestinationRule {first.name}: one "
            "DestinationRule per Service (put the subsets and policies together)",
        )


def _rate_limit(resource: RateLimit, index: _Index) -> Iterator[FieldError]:
    if resource.spec.service not in index.services:
        yield FieldError(
            resource.KIND,
            resource.name,
            "spec.service",
            f"Service {resource.spec.service} does not exist",
        )
