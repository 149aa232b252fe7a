"""Who a view is compiled for: a sidecar of one Service, or a gateway.

The compiler's third input. A proxy is known by its SPIFFE ID (the agent attested it)
and the labels it runs with (``--label K=V``), which workload selectors
(``selector.matchLabels``), Gateway selectors and ``sourceLabels`` are matched against::

    SidecarProxy(service="orders", spiffe_id="spiffe://example.org/orders",
                 labels={"app": "orders", "version": "v2"})
    GatewayProxy(spiffe_id="spiffe://example.org/gateway", labels={"istio": "ingressgateway"})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

__all__ = [
    "GatewayProxy",
    "Proxy",
    "SidecarProxy",
    "labels_match",
]


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` has every key of ``selector`` with the same value (Kubernetes'
    ``matchLabels``; an empty selector matches every workload)."""
    return all(labels.get(key) == value for key, value in selector.items())


def _frozen(labels: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(labels.items())))


@dataclass(frozen=True)
class SidecarProxy:
    """The sidecar in front of an instance of ``service``."""

    service: str
    spiffe_id: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    KIND: ClassVar[str] = "sidecar"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "service": self.service,
            "spiffeId": self.spiffe_id,
            "labels": dict(self.labels),
        }

    def __str__(self) -> str:
        if not self.service:
            return f"sidecar ({self.spiffe_id})"
        return f"sidecar of {self.service} ({self.spiffe_id})"


@dataclass(frozen=True)
class GatewayProxy:
    """A ``tessera gateway``: serves the Gateways whose selector its labels match."""

    spiffe_id: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    KIND: ClassVar[str] = "gateway"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.KIND, "spiffeId": self.spiffe_id, "labels": dict(self.labels)}

    def __str__(self) -> str:
        shown = ", ".join(f"{key}={value}" for key, value in self.labels.items())
        return f"gateway {{{shown}}} ({self.spiffe_id})"


Proxy = SidecarProxy | GatewayProxy
ProxyKind = Literal["sidecar", "gateway"]
