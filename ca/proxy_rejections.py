"""What the mesh's Envoys refused: the NACKs agents report, for ``tessera mesh describe``.

An Envoy that refuses a response of its agent (a NACK, with Envoy's reason) keeps running
the configuration it accepted before, so nothing breaks loudly: the change just does not
happen. Each agent therefore tells the server, with every report of its instances
(``PUT /v1/agent/instances``, field ``rejections``), the NACKs still standing among the
Envoys it serves (:meth:`workload_api.xds.DiscoveryStatus.current_rejections`): the last
one of each proxy and type, when the proxy has accepted nothing of that type since and is
still connected. At most :data:`MAX_REJECTIONS_PER_AGENT` per report, each reason cut
to :data:`MAX_REASON_CHARS`.

The server keeps each agent's last list **in memory** (:class:`ProxyRejections`), not in
the datastore: it is the proxies' current state, not configuration, and it is rebuilt by
the next reports after a restart. An agent's list is **replaced** by its next report (so
a NACK superseded by an ACK of a later version, or whose Envoy went away, leaves with the
report that follows, which the agent sends at once) and **dropped** when the agent's
report lease runs out (it stopped reporting). With several servers, each knows the lists
of the agents that last reported to it.

``tessera mesh describe SERVICE`` shows those of the Service's sidecars, and of the
gateways whose view routes to the Service (:meth:`ProxyRejections.of_service`)::

    Envoy sidecar~node-1~users~15006 on node spiffe://example.org/tessera/agent/x509pop/n1
    rejected listeners (version 3f2a...): malformed IP address: localhost
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from sdk.clock import Clock

if TYPE_CHECKING:
    from mesh import Config
    from mesh.catalog import Catalog

__all__ = [
    "MAX_REASON_CHARS",
    "MAX_REJECTIONS_PER_AGENT",
    "ProxyRejection",
    "ProxyRejections",
    "type_name",
]

MAX_REJECTIONS_PER_AGENT: Final = 64
"""NACKs one report may carry (the proxies of a node, a few types each)."""
MAX_REASON_CHARS: Final = 1024
"""How much of Envoy's reason a report carries."""

_TYPE_NAMES: Final = {
    "type.googleapis.com/envoy.config.listener.v3.Listener": "listeners",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "clusters",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "routes",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "endpoints",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret": "secrets",
}


def type_name(type_url: str) -> str:
    """``listeners`` for Envoy's Listener type URL (and so on); another type's own name."""
    return _TYPE_NAMES.get(type_url, type_url.rpartition("/")[2] or type_url)


@dataclass(frozen=True)
class ProxyRejection:
    """One NACK an agent reported: which Envoy, what it is, what it refused and why."""

    agent: str
    """The SPIFFE ID of the agent serving the Envoy (its node)."""
    node_id: str
    proxy: str
    """``sidecar`` or ``gateway`` (its bootstrap's ``tessera.proxy``); empty if it said
    neither."""
    service: str
    """A sidecar's Service (``tessera.service``)."""
    labels: Mapping[str, str] = field(hash=False)
    spiffe_id: str
    type_url: str
    version: str
    """The version refused; the Envoy keeps running the one it accepted before."""
    reason: str
    at: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(sorted(self.labels.items()))))

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "node_id": self.node_id,
            "proxy": self.proxy,
            "service": self.service,
            "labels": dict(self.labels),
            "spiffe_id": self.spiffe_id,
            "type": type_name(self.type_url),
            "type_url": self.type_url,
            "version": self.version,
            "reason": self.reason,
            "at": self.at.isoformat(),
        }


class ProxyRejections:
    """Each agent's last reported NACKs, until its report lease runs out; thread-safe."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._by_agent: dict[str, tuple[datetime, tuple[ProxyRejection, ...]]] = {}

    def report(self, agent: str, rejections: Iterable[ProxyRejection], *, lease: timedelta) -> None:
        """Make ``rejections`` the whole list of ``agent``, kept for ``lease``."""
        kept = tuple(rejections)
        with self._lock:
            if kept:
                self._by_agent[agent] = (self._clock.now() + lease, kept)
            else:
                self._by_agent.pop(agent, None)

    def current(self) -> list[ProxyRejection]:
        """Every agent's standing NACKs, oldest first; those of agents whose lease ran out
        are dropped."""
        now = self._clock.now()
        with self._lock:
            for agent, (expires, _) in list(self._by_agent.items()):
                if expires <= now:
                    del self._by_agent[agent]
            found = [r for _, rejections in self._by_agent.values() for r in rejections]
        return sorted(found, key=lambda r: (r.at, r.agent, r.node_id, r.type_url))

    def of_service(self, config: Config, catalog: Catalog, service: str) -> list[ProxyRejection]:
        """The standing NACKs of ``service``'s sidecars, and of the gateways whose view
        (compiled from ``config`` for their labels) has a cluster of ``service``."""
        return [
            rejection
            for rejection in self.current()
            if (rejection.proxy == "sidecar" and rejection.service == service)
            or (rejection.proxy == "gateway" and _routes_to(config, catalog, rejection, service))
        ]


def _routes_to(config: Config, catalog: Catalog, gateway: ProxyRejection, service: str) -> bool:
    from mesh.compile import compile_view  # on a describe's first call: not at the start
    from mesh.proxy import GatewayProxy

    view = compile_view(config, catalog, GatewayProxy(gateway.spiffe_id, gateway.labels))
    return any(cluster.service == service for cluster in view.clusters)
