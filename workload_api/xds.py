"""Envoy's discovery services on the agent's socket: what they serve, and where it comes from.

The agent serves the Envoy proxies of its node (a ``tessera sidecar``'s, a gateway's)
the xDS v3 APIs on the Unix socket of the SPIFFE Workload API, under the same limits
(:mod:`workload_api.grpc_limits`). Each caller is attested by its peer credentials,
as any workload is, and gets only what its identity allows:

- **SDS** (``SecretDiscoveryService``, and the Secret type over ADS): the caller's own
  SVIDs and the bundles of its trust domains, by the names SPIRE's agent uses
  (:mod:`workload_api.sds`). Pushed as soon as an SVID rotates.
- **ADS** (``AggregatedDiscoveryService``, state of the world): listeners, clusters,
  routes and endpoints from a :class:`ResourceSource`, with versions, nonces and
  ACK/NACK per type (:mod:`workload_api.xds_protocol`). A NACK is logged with Envoy's
  reason and kept in :class:`DiscoveryStatus`.

The agent plugs them in with one call; without the ``tessera[envoy]`` extra
(``xds-protos``) the call returns no services and logs which extra to install::

    status = DiscoveryStatus()
    services = discovery_services(agent, trust_domain, resources=source, status=status)
    server = WorkloadApiServer(agent, services=services)
    status.rejections()          # the last NACK per proxy and type
    status.current_rejections()  # those still standing: the agent reports them to the server

A :class:`ResourceSource` says what one proxy gets, as dictionaries in Envoy's JSON
form, each with its ``"@type"``::

    class MeshResources:
        def resources(self, node: NodeInfo, proxy: AttestedProxy) -> Resources:
            return {LISTENER_TYPE: [{"@type": LISTENER_TYPE, "name": "inbound", ...}], ...}
        def version(self) -> int: ...                        # changes when any answer would
        async def wait_for_change(self, seen: int) -> int: ...

This module needs no ``xds-protos``: a source is written against these names only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from attestor.selector import Selector
from attestor.workload import PeerCredentials

if TYPE_CHECKING:
    from spiffe import TrustDomain

    from workload_api.identity import IdentityProvider
    from workload_api.server import ExtraService

__all__ = [
    "CLUSTER_TYPE",
    "ENDPOINT_TYPE",
    "LISTENER_TYPE",
    "PUSH_ORDER",
    "ROUTE_TYPE",
    "SECRET_TYPE",
    "WILDCARD_TYPES",
    "AttestedProxy",
    "DiscoveryStatus",
    "NoResources",
    "NodeInfo",
    "Rejection",
    "ResourceSource",
    "Resources",
    "TypeStatus",
    "discovery_services",
]

LISTENER_TYPE: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_TYPE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ENDPOINT_TYPE: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET_TYPE: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105

WILDCARD_TYPES: Final = frozenset({LISTENER_TYPE, CLUSTER_TYPE})
"""Types Envoy asks for whole: every response carries every resource of the type, and
a resource left out is removed. Envoy asks for the others by name."""

PUSH_ORDER: Final = (SECRET_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)
"""The order of the responses when several types change at once: what a resource refers
to arrives before it (secrets, then clusters and their endpoints, then the listeners
that route to them and their routes), so Envoy never sends traffic to a cluster it does
not know yet. Other types follow, by type URL."""

Resources = Mapping[str, Sequence[Mapping[str, Any]]]
"""Type URL -> resources in Envoy's JSON form (``json_format`` names), each with ``"@type"``."""

MAX_TRACKED_NODES: Final = 4096
"""Proxies :class:`DiscoveryStatus` remembers; the one heard from longest ago goes first."""
MAX_REASON_CHARS: Final = 4096
"""How much of Envoy's reason for a NACK is kept and logged."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeInfo:
    """The Envoy node of a discovery stream, as its first request described it.

    ``id`` and ``cluster`` are never empty (the agent refuses a stream without them);
    they come from Envoy's bootstrap, so they say which proxy this is, not who it is:
    that is :class:`AttestedProxy`.
    """

    id: str
    cluster: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """``node.metadata`` as JSON values."""
    user_agent: str = ""
    """E.g. ``envoy 1.40.0``."""


@dataclass(frozen=True)
class AttestedProxy:
    """Who is on the other end of a discovery stream, as the kernel and attestation say."""

    peer: PeerCredentials
    selectors: frozenset[Selector]
    spiffe_ids: tuple[str, ...]
    """The SPIFFE IDs of the caller's SVIDs, its default first; empty while it has none."""


class ResourceSource(Protocol):
    """What each proxy gets over ADS, besides the secrets the agent adds itself.

    :meth:`resources` is called on the agent's event loop when a stream starts and
    after each change of :meth:`version` or of the caller's SPIFFE IDs: it must be
    quick and must not block (build views ahead, keep them in memory). A resource
    Envoy's API does not accept is left out, with an error in the agent's log.
    """

    def resources(self, node: NodeInfo, proxy: AttestedProxy) -> Resources:
        """Type URL -> the resources of that type for this proxy."""
        ...

    def version(self) -> int:
        """A number that changes whenever :meth:`resources` would answer differently."""
        ...

    async def wait_for_change(self, seen_version: int) -> int:
        """Return the current version as soon as it differs from ``seen_version``."""
        ...


class NoResources:
    """A source with nothing: proxies get only their secrets (no mesh view yet)."""

    def __init__(self) -> None:
        self._never = asyncio.Event()

    def resources(self, node: NodeInfo, proxy: AttestedProxy) -> Resources:
        return {}

    def version(self) -> int:
        return 0

    async def wait_for_change(self, seen_version: int) -> int:
        await self._never.wait()
        return 0


@dataclass(frozen=True)
class Rejection:
    """A NACK: Envoy refused a response, and said why."""

    node_id: str
    node_cluster: str
    type_url: str
    version: str
    """The version Envoy refused; it keeps running the one it accepted before."""
    reason: str
    """Envoy's ``error_detail.message``, cut at :data:`MAX_REASON_CHARS`."""
    at: datetime
    pid: int
    """The proxy process's pid when it refused."""
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """The proxy's ``node.metadata`` (:attr:`NodeInfo.metadata`): what it says it is."""


@dataclass(frozen=True)
class TypeStatus:
    """What one proxy did with one type: the version it accepted last, its last NACK."""

    accepted_version: str = ""
    accepted_at: datetime | None = None
    rejection: Rejection | None = None


class DiscoveryStatus:
    """ACKs and NACKs per proxy (node id) and type, for ``tessera mesh describe``.

    Kept in memory for the agent's lifetime; at most :data:`MAX_TRACKED_NODES` proxies,
    the one heard from longest ago forgotten first. The last NACK of a type stays until
    the next one, a later ACK notwithstanding (``accepted_at`` says which came last).
    :meth:`current_rejections` gives only those still standing: of a proxy connected now,
    not followed by an ACK. ``on_change`` is called when what it gives may have changed
    (a NACK, an ACK after one, a proxy's last stream ending).
    """

    def __init__(
        self, max_nodes: int = MAX_TRACKED_NODES, *, on_change: Callable[[], None] | None = None
    ) -> None:
        self._max_nodes = max_nodes
        self._nodes: OrderedDict[str, dict[str, TypeStatus]] = OrderedDict()
        self._streams: dict[str, int] = {}
        self.on_change = on_change

    def node(self, node_id: str) -> Mapping[str, TypeStatus]:
        """Type URL -> status for one proxy (empty if never heard from)."""
        return dict(self._nodes.get(node_id, {}))

    def node_ids(self) -> list[str]:
        return sorted(self._nodes)

    def accepted(self, node_id: str) -> dict[str, str]:
        """Type URL -> the version the proxy accepted last."""
        return {
            type_url: status.accepted_version
            for type_url, status in self._nodes.get(node_id, {}).items()
            if status.accepted_at is not None
        }

    def rejections(self, node_id: str | None = None) -> list[Rejection]:
        """The last NACK of each proxy (or of ``node_id``) and type, oldest first."""
        nodes = [node_id] if node_id is not None else list(self._nodes)
        found = [
            status.rejection
            for name in nodes
            for status in self._nodes.get(name, {}).values()
            if status.rejection is not None
        ]
        return sorted(found, key=lambda rejection: rejection.at)

    def current_rejections(self) -> list[Rejection]:
        """The NACKs still standing, oldest first: the last one of each type of each
        connected proxy, when the proxy has accepted nothing of that type since."""
        return [
            rejection
            for rejection in self.rejections()
            if self._streams.get(rejection.node_id)
            and _standing(self._nodes[rejection.node_id][rejection.type_url])
        ]

    def stream_opened(self, node_id: str) -> None:
        """A discovery stream of ``node_id`` began."""
        self._streams[node_id] = self._streams.get(node_id, 0) + 1

    def stream_closed(self, node_id: str) -> None:
        """A discovery stream of ``node_id`` ended; its NACKs stop standing with its last."""
        left = self._streams.get(node_id, 0) - 1
        if left > 0:
            self._streams[node_id] = left
            return
        self._streams.pop(node_id, None)
        if self.rejections(node_id):
            self._changed()

    def record_ack(self, node_id: str, type_url: str, version: str) -> None:
        types = self._types(node_id)
        previous = types.get(type_url, TypeStatus())
        types[type_url] = TypeStatus(version, datetime.now(UTC), previous.rejection)
        if _standing(previous):
            self._changed()  # the NACK is superseded

    def record_nack(self, rejection: Rejection) -> None:
        types = self._types(rejection.node_id)
        previous = types.get(rejection.type_url, TypeStatus())
        types[rejection.type_url] = TypeStatus(
            previous.accepted_version, previous.accepted_at, rejection
        )
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _types(self, node_id: str) -> dict[str, TypeStatus]:
        types = self._nodes.get(node_id)
        if types is None:
            types = self._nodes[node_id] = {}
            while len(self._nodes) > self._max_nodes:
                self._nodes.popitem(last=False)
        self._nodes.move_to_end(node_id)
        return types


def _standing(status: TypeStatus) -> bool:
    """Whether the type's last NACK came after its last ACK."""
    rejection = status.rejection
    return rejection is not None and (
        status.accepted_at is None or status.accepted_at < rejection.at
    )


# The top-level packages xds-protos installs; a missing one means the extra is absent.
_XDS_PROTOS_PACKAGES: Final = frozenset({"envoy", "xds", "udpa", "validate"})


def discovery_services(
    provider: IdentityProvider,
    trust_domain: TrustDomain | str,
    *,
    resources: ResourceSource | None = None,
    status: DiscoveryStatus | None = None,
) -> list[ExtraService]:
    """SDS and ADS for :class:`~workload_api.server.WorkloadApiServer`'s ``services``.

    ``trust_domain`` is the agent's (``ROOTCA`` is its bundle); ``resources`` says what
    proxies get over ADS besides secrets (none by default); ``status`` collects ACKs and
    NACKs. Without ``xds-protos`` this logs that the services are off and returns none.
    """
    try:
        from workload_api import xds_server
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in _XDS_PROTOS_PACKAGES:
            raise
        _log.info(
            "Envoy's discovery services (SDS, ADS) are off: the xds-protos package is not "
            "installed; install the envoy extra to serve Envoy: pip install 'tessera[envoy]'"
        )
        return []
    name = trust_domain if isinstance(trust_domain, str) else trust_domain.name
    return xds_server.discovery_services(
        provider,
        name,
        resources=resources if resources is not None else NoResources(),
        status=status if status is not None else DiscoveryStatus(),
    )
