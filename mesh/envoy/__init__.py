"""Envoy's configuration from a proxy's view: the render step of the mesh.

Pure, like the compiler before it — no file, socket or process: a compiled
:class:`~mesh.view.View` in, Envoy v3 xDS resources out (dicts in proto3 JSON, each
with its ``@type``), for the agent's xDS server to serve over ADS::

    from mesh.envoy import SidecarAddresses, render_sidecar, build_bootstrap

    resources = render_sidecar(view, SidecarAddresses(inbound=..., app=..., outbound=...))
    resources.by_type()       # {LISTENER: [...], ROUTE_CONFIGURATION: [...], CLUSTER: [...],
                              #  CLUSTER_LOAD_ASSIGNMENT: [...]}
    resources.problems        # what Envoy could not be given, in sentences

Every element carries where it came from, as far as Envoy keeps it: a route's ``name``
is the ``match`` entry it came from, and listeners, virtual hosts, routes, clusters and
endpoints have ``metadata.filter_metadata.tessera.source`` (``VirtualService reviews
spec.http[0]``), so ``tessera mesh describe`` can relate Envoy's objects to resources.

The modules:

- :mod:`mesh.envoy.render` — :func:`render_sidecar`, :func:`render_gateway`;
- :mod:`mesh.envoy.proxyless` — ``render_proxyless``: a sidecar's view for gRPC's own
  xDS client (``xds:///`` targets, no proxy);
- :mod:`mesh.envoy.resources` — :class:`Resources`, the type URLs, the SDS names;
- :mod:`mesh.envoy.listeners` — listeners and connection managers, the access log;
- :mod:`mesh.envoy.routes` — virtual hosts and routes;
- :mod:`mesh.envoy.clusters` — clusters and endpoints, upstream mTLS;
- :mod:`mesh.envoy.policies` — RBAC, the caller's identity, rate limits, JWTs;
- :mod:`mesh.envoy.tracing` — spans over OTLP (Envoy's OpenTelemetry tracer);
- :mod:`mesh.envoy.bootstrap` — :func:`build_bootstrap`;
- :mod:`mesh.envoy.values` — how values are spelled in Envoy's JSON.
"""

from __future__ import annotations

from mesh.envoy.bootstrap import build_bootstrap
from mesh.envoy.listeners import INBOUND, OUTBOUND, gateway_name
from mesh.envoy.policies import IDENTITY_HEADER
from mesh.envoy.render import (
    RenderOptions,
    SidecarAddresses,
    app_cluster_name,
    render_gateway,
    render_sidecar,
)
from mesh.envoy.resources import (
    ALL_SECRET,
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
    LISTENER,
    RESOURCE_TYPES,
    ROOTCA_SECRET,
    ROUTE_CONFIGURATION,
    SECRET,
    XDS_CLUSTER,
    Resources,
    identity_secret,
    resource_name,
)

__all__ = [
    "ALL_SECRET",
    "CLUSTER",
    "CLUSTER_LOAD_ASSIGNMENT",
    "IDENTITY_HEADER",
    "INBOUND",
    "LISTENER",
    "OUTBOUND",
    "RESOURCE_TYPES",
    "ROOTCA_SECRET",
    "ROUTE_CONFIGURATION",
    "SECRET",
    "XDS_CLUSTER",
    "RenderOptions",
    "Resources",
    "SidecarAddresses",
    "app_cluster_name",
    "build_bootstrap",
    "gateway_name",
    "identity_secret",
    "render_gateway",
    "render_sidecar",
    "resource_name",
]
