"""The service catalog: the instances of each Service, where they are and whether they serve.

The compiler's second input, next to the configuration: pure data, filled by whoever
holds it (the server's store of what the agents registered, a test's table)::

    catalog = Catalog([
        Instance(
            service="users-service",
            address=HostPort("10.0.0.5", 8443),          # the instance's inbound mTLS listener
            node="spiffe://example.org/agent/node-1",    # the agent that registered it
            labels={"version": "v1"},
            health="healthy",
            since=datetime(2025, 1, 1, tzinfo=UTC),      # when health last changed
            spiffe_id="spiffe://example.org/users",      # the workload behind it
            detail=None,                                 # why it is unhealthy, when it is
        ),
    ])
    catalog.instances("users-service")     # by address, then node

``health`` is ``healthy`` or ``unhealthy`` once the agent ran the Service's health check,
``unknown`` before that; which of them receive requests is the compiler's decision
(:func:`is_routable`). An unhealthy instance carries its check's last failure in
``detail`` (``HTTP 503 from 127.0.0.1:8080/healthz``), one line of at most
:data:`MAX_HEALTH_DETAIL` characters (:func:`one_line`), shown by ``tessera mesh
services`` and ``describe``; it is for people, and routes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Literal

from sdk.address import HostPort

__all__ = [
    "MAX_HEALTH_DETAIL",
    "Catalog",
    "Health",
    "Instance",
    "is_routable",
    "one_line",
]

Health = Literal["healthy", "unhealthy", "unknown"]

MAX_HEALTH_DETAIL: Final = 200
"""The longest ``detail`` an instance carries (an agent cuts a longer one)."""


def one_line(text: str, limit: int) -> str:
    """``text`` as one line a terminal shows as it is: every run of whitespace or control
    characters one space, cut to ``limit`` characters with a trailing ``...``."""
    words = "".join(c if c.isprintable() else " " for c in text).split()
    line = " ".join(words)
    return line if len(line) <= limit else line[: max(0, limit - 3)].rstrip() + "..."


@dataclass(frozen=True)
class Instance:
    """One instance of a Service, as its sidecar registered it through its agent."""

    service: str
    address: HostPort
    node: str
    labels: Mapping[str, str] = field(hash=False)
    health: Health
    since: datetime
    spiffe_id: str
    detail: str | None = None
    """Why it is unhealthy, as its agent's check said; None when it is not."""

    def __post_init__(self) -> None:
        # A read-only copy in key order: an instance cannot change under a view.
        object.__setattr__(self, "labels", MappingProxyType(dict(sorted(self.labels.items()))))

    @property
    def sort_key(self) -> tuple[str, int, str]:
        return (self.address.host, self.address.port, self.node)

    def to_json(self) -> dict[str, Any]:
        """What ``tessera mesh services --output json`` prints for it."""
        return {
            "service": self.service,
            "address": str(self.address),
            "node": self.node,
            "labels": dict(self.labels),
            "health": self.health,
            "since": self.since.isoformat(),
            "spiffeId": self.spiffe_id,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Instance:
        """The inverse of :meth:`to_json`; ValueError, TypeError or KeyError (an
        ``sdk.errors.ConfigError`` for the address) when ``data`` is not one."""
        labels = data["labels"]
        if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise TypeError("an instance's labels must map strings to strings")
        health = data["health"]
        if health not in ("healthy", "unhealthy", "unknown"):
            raise ValueError(f"{health!r} is not a health")
        since = datetime.fromisoformat(str(data["since"]))
        if since.tzinfo is None:
            raise ValueError("an instance's since has no time zone")
        detail = data.get("detail")
        if detail is not None and not isinstance(detail, str):
            raise TypeError("an instance's detail must be a string")
        return cls(
            service=str(data["service"]),
            address=HostPort.parse(data["address"], what="instance address"),
            node=str(data["node"]),
            labels=labels,
            health=health,
            since=since,
            spiffe_id=str(data["spiffeId"]),
            detail=detail,
        )


def is_routable(instance: Instance, *, has_health_check: bool) -> bool:
    """Whether requests may be sent to ``instance``.

    ``healthy``: yes. ``unhealthy``: no. ``unknown``: only when its Service has no health
    check, since then nothing will ever tell (it would otherwise never serve); when the
    Service has a check, an instance not yet checked waits for its first result, as a
    Kubernetes pod waits for its readiness probe before joining its Service's endpoints
    and as Consul starts a checked instance as critical. An instance that crashes before
    its next check is routed around by outlier detection, not by this rule.
    """
    if instance.health == "healthy":
        return True
    return instance.health == "unknown" and not has_health_check


class Catalog:
    """Every instance, by Service; immutable."""

    __slots__ = ("_by_service",)

    def __init__(self, instances: Iterable[Instance] = ()) -> None:
        by_service: dict[str, list[Instance]] = {}
        for instance in instances:
            by_service.setdefault(instance.service, []).append(instance)
        self._by_service: Mapping[str, tuple[Instance, ...]] = {
            service: tuple(sorted(found, key=lambda instance: instance.sort_key))
            for service, found in sorted(by_service.items())
        }

    def __iter__(self) -> Iterator[Instance]:
        """Every instance, by Service name, then address."""
        for instances in self._by_service.values():
            yield from instances

    def __len__(self) -> int:
        return sum(len(instances) for instances in self._by_service.values())

    def __repr__(self) -> str:
        return f"Catalog({len(self)} instances)"

    def services(self) -> tuple[str, ...]:
        """The names of the Services that have instances, sorted."""
        return tuple(self._by_service)

    def instances(self, service: str) -> tuple[Instance, ...]:
        """The instances of ``service`` (none if it has none), by address then node."""
        return self._by_service.get(service, ())

    def of_workload(self, spiffe_id: str) -> tuple[Instance, ...]:
        """The instances a workload with ``spiffe_id`` serves, whatever their Service."""
        return tuple(instance for instance in self if instance.spiffe_id == spiffe_id)
