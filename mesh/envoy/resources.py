"""What a render gives the xDS server: Envoy's resources by type, each with its name.

A :class:`Resources` is one proxy's whole configuration, built at once from one view —
go-control-plane's *snapshot* — so the server never serves a listener whose routes or
clusters belong to another view::

    resources = render_sidecar(view, addresses)
    for type_url, items in resources.by_type().items():
        version = resources.version(type_url)       # a digest of that type's resources
        names = [resource_name(item) for item in items]

The names the agent and the renderer agree on are here too: the xDS cluster
(:data:`XDS_CLUSTER`) and the SDS secrets (:func:`identity_secret`, :data:`ALL_SECRET`,
:data:`ROOTCA_SECRET`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final

from mesh.envoy.values import TYPE_PREFIX

__all__ = [
    "ALL_SECRET",
    "CLUSTER",
    "CLUSTER_LOAD_ASSIGNMENT",
    "LISTENER",
    "RESOURCE_TYPES",
    "ROOTCA_SECRET",
    "ROUTE_CONFIGURATION",
    "SECRET",
    "XDS_CLUSTER",
    "Resources",
    "identity_secret",
    "resource_name",
]

LISTENER: Final = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE_CONFIGURATION: Final = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
CLUSTER_LOAD_ASSIGNMENT: Final = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET: Final = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
RESOURCE_TYPES: Final = (LISTENER, ROUTE_CONFIGURATION, CLUSTER, CLUSTER_LOAD_ASSIGNMENT)
"""The types a render gives, in the order an xDS server sends them on a new stream
(clusters and their endpoints before the listeners and routes that use them is the
order Envoy warms in; the server may follow either)."""

XDS_CLUSTER: Final = "tessera_agent"
"""The bootstrap's cluster: the agent's Unix socket, over which ADS and SDS run."""

ALL_SECRET: Final = "ALL"  # noqa: S105  (a secret's name, not a secret)
"""SDS: a validation context trusting every trust domain the agent knows (its own and
the federated ones), checked with Envoy's SPIFFE certificate validator."""

ROOTCA_SECRET: Final = "ROOTCA"  # noqa: S105  (a name too)
"""SDS: the proxy's own trust domain's bundle only."""


def identity_secret(spiffe_id: str) -> str:
    """The SDS name of a proxy's own certificate and key: its SPIFFE ID."""
    return spiffe_id


_NAME_FIELD = {
    LISTENER: "name",
    ROUTE_CONFIGURATION: "name",
    CLUSTER: "name",
    CLUSTER_LOAD_ASSIGNMENT: "cluster_name",
}


def resource_name(resource: dict[str, Any]) -> str:
    """The name an xDS client asks for a resource by (a ClusterLoadAssignment's is its
    ``cluster_name``)."""
    type_url = resource["@type"]
    return str(resource[_NAME_FIELD[type_url]])


@dataclass(frozen=True)
class Resources:
    """One proxy's Envoy resources, each a JSON-ready dict with its ``@type``.

    ``problems`` are what the view holds and Envoy could not be given (an endpoint with
    a host name, a second default filter chain), each said in a sentence, for the agent
    to log and ``describe`` to show.
    """

    listeners: tuple[dict[str, Any], ...]
    route_configurations: tuple[dict[str, Any], ...]
    clusters: tuple[dict[str, Any], ...]
    cluster_load_assignments: tuple[dict[str, Any], ...]
    problems: tuple[str, ...] = ()

    def by_type(self) -> dict[str, list[dict[str, Any]]]:
        """The resources by type URL, every type present (an empty list: none of it)."""
        return {
            LISTENER: list(self.listeners),
            ROUTE_CONFIGURATION: list(self.route_configurations),
            CLUSTER: list(self.clusters),
            CLUSTER_LOAD_ASSIGNMENT: list(self.cluster_load_assignments),
        }

    def of_type(self, type_url: str) -> list[dict[str, Any]]:
        try:
            return self.by_type()[type_url]
        except KeyError:
            known = ", ".join(RESOURCE_TYPES)
            raise ValueError(f"a render has no {type_url}; it has {known}") from None

    def named(self, type_url: str, name: str) -> dict[str, Any] | None:
        """The resource of ``type_url`` called ``name``, or None."""
        return next((item for item in self.of_type(type_url) if resource_name(item) == name), None)

    def version(self, type_url: str) -> str:
        """A digest of the resources of one type: equal resources, equal versions (what
        the xDS server sends as ``version_info``)."""
        text = json.dumps(
            self.of_type(type_url), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]
