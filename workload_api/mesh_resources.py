"""What each Envoy on the node gets over ADS: its compiled view of the mesh, rendered.

The agent holds the mesh's configuration and catalog (:class:`MeshState`); an Envoy
says in its bootstrap's ``node.metadata`` what it is (:func:`mesh.envoy.build_bootstrap`
writes these keys), and proves who it is by its peer credentials::

    tessera.proxy     "sidecar", "gateway" or "grpc" (gRPC's own xDS client, proxyless)
    tessera.service   the Service a sidecar fronts
    tessera.labels    its labels, as a JSON object
    tessera.spiffe_id the SVID it serves with (one it holds; its default one if left out)
    tessera.inbound, tessera.app, tessera.outbound   a sidecar's HOST:PORTs (without
                      tessera.outbound, the sidecar only serves callers)
    tessera.host, tessera.port_offset                where a gateway listens
    tessera.certificate_provider   a grpc client's bootstrap certificate provider
                                   (mesh.envoy.proxyless; "none": no upstream mTLS)

The metadata chooses only which view; the identity in it must be one of the caller's
SVIDs, or the proxy gets nothing (and the log says why, once per node). Views are
rendered once per (mesh revision, node, identity, JWT bundles) and kept for the streams
of the same proxy.

A ``RequestAuthentication`` naming a trust domain checks its JWT-SVIDs against that
domain's JWT bundle: the agent's own, or a federated one the proxy's entries federate
with (what the Workload API's JWT bundle stream gives the same process). The bundles
come from ``bundles`` (the agent), and a change of them — a JWT key rotated — moves
:meth:`MeshResourceSource.version`, so every proxy gets its keys again::

    source = MeshResourceSource(agent.mesh, RenderOptions(otlp_endpoint=...), bundles=agent)
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final, Protocol

from attestor.selector import Selector
from mesh.compile import compile_view
from mesh.envoy import RenderOptions, SidecarAddresses, render_gateway, render_sidecar
from mesh.envoy.proxyless import DEFAULT_CERTIFICATE_PROVIDER, render_proxyless
from mesh.proxy import GatewayProxy, Proxy, SidecarProxy
from mesh.registration import label_problem
from sdk.address import HostPort
from sdk.errors import ConfigError
from workload_api.mesh_sync import MeshState
from workload_api.xds import AttestedProxy, NodeInfo, Resources

__all__ = ["JwtBundles", "MeshResourceSource", "proxy_of"]

_log = logging.getLogger(__name__)
_CACHED: Final = 256
_SPIFFE: Final = "spiffe://"


class JwtBundles(Protocol):
    """Where the JWT bundles come from: the agent (a part of its IdentityProvider)."""

    def jwt_bundles(self, selectors: frozenset[Selector]) -> Mapping[str, bytes]:
        """``spiffe://<trust domain>`` -> its JWK Set in JSON, for a caller's selectors."""
        ...

    def version(self) -> int:
        """A number that changes whenever :meth:`jwt_bundles` may answer differently."""
        ...

    async def wait_for_change(self, seen_version: int) -> int: ...


class MeshResourceSource:
    """A :class:`workload_api.xds.ResourceSource` over the agent's mesh state (and its
    JWT bundles, when ``bundles`` is given)."""

    def __init__(
        self,
        mesh: MeshState,
        options: RenderOptions | None = None,
        *,
        bundles: JwtBundles | None = None,
    ) -> None:
        self._mesh = mesh
        self._options = options or RenderOptions()
        self._bundles = bundles
        self._cache: dict[tuple[Any, ...], Resources] = {}
        self._refused: dict[str, str] = {}
        self._inputs: tuple[int, int] | None = None
        self._version = 0

    def version(self) -> int:
        """Moves when the mesh revision or the bundles' version does."""
        inputs = (self._mesh.revision, self._bundles.version() if self._bundles else 0)
        if inputs != self._inputs:
            self._inputs = inputs
            self._version += 1
        return self._version

    async def wait_for_change(self, seen_version: int) -> int:
        while (version := self.version()) == seen_version:
            assert self._inputs is not None
            revision, bundles_version = self._inputs
            waits = {asyncio.ensure_future(self._mesh.wait_for_change(revision))}
            if self._bundles is not None:
                waits.add(asyncio.ensure_future(self._bundles.wait_for_change(bundles_version)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
        return version

    def resources(self, node: NodeInfo, proxy: AttestedProxy) -> Resources:
        try:
            chosen, render = proxy_of(node, proxy)
        except ConfigError as err:
            self._refuse(node.id, err.message)
            return {}
        jwt_bundles = self._jwt_bundles(proxy.selectors)
        key = (self._mesh.revision, node.id, json.dumps(dict(node.metadata), sort_keys=True),
               chosen.spiffe_id, tuple(sorted(jwt_bundles.items())))
        cached = self._cache.get(key)
        if cached is not None:
            self._refused.pop(node.id, None)
            return cached
        view = compile_view(self._mesh.config, self._mesh.catalog, chosen)
        options = self._options
        if self._bundles is not None:
            options = replace(options, jwt_bundles=jwt_bundles)
        try:
            rendered = render(view, options)
        except ValueError as err:  # the metadata's addresses cannot be Envoy's
            self._refuse(node.id, str(err))
            return {}
        self._refused.pop(node.id, None)
        for problem in rendered.problems:
            _log.info("Envoy %s: %s", node.id, problem)
        resources: Resources = rendered.by_type()
        if len(self._cache) >= _CACHED:
            self._cache.clear()
        self._cache[key] = resources
        return resources

    def _refuse(self, node_id: str, why: str) -> None:
        """Say once per proxy and reason why it gets nothing."""
        if self._refused.get(node_id) != why:
            self._refused[node_id] = why
            _log.warning("Envoy %s gets no mesh configuration: %s", node_id, why)

    def _jwt_bundles(self, selectors: frozenset[Selector]) -> dict[str, str]:
        """Trust domain name -> JWK Set JSON, as :class:`RenderOptions` takes them."""
        if self._bundles is None:
            return {}
        return {
            trust_domain.removeprefix(_SPIFFE): jwks.decode()
            for trust_domain, jwks in self._bundles.jwt_bundles(selectors).items()
        }


def proxy_of(node: NodeInfo, proxy: AttestedProxy) -> tuple[Proxy, Any]:
    """The proxy an Envoy's metadata describes and the function rendering its view;
    ConfigError saying what is missing or not allowed."""
    metadata = node.metadata
    if not proxy.spiffe_ids:
        raise ConfigError("the Envoy process holds no SVID (no registration entry matches it)")
    spiffe_id = _text(metadata, "tessera.spiffe_id") or proxy.spiffe_ids[0]
    if spiffe_id not in proxy.spiffe_ids:
        raise ConfigError(f"its bootstrap names {spiffe_id}, an SVID the Envoy process does "
                          f"not hold (it holds {', '.join(proxy.spiffe_ids)})")
    labels = _labels(metadata)
    kind = _text(metadata, "tessera.proxy")
    if kind == "sidecar":
        service = _text(metadata, "tessera.service")
        if not service:
            raise ConfigError("its bootstrap's node.metadata has no tessera.service")
        addresses = SidecarAddresses(
            inbound=_address(metadata, "tessera.inbound"),
            app=_address(metadata, "tessera.app"),
            outbound=(
                _address(metadata, "tessera.outbound")
                if _text(metadata, "tessera.outbound")
                else None
            ),
        )

        def sidecar(view: Any, options: RenderOptions) -> Any:
            return render_sidecar(view, addresses, options)

        return SidecarProxy(service, spiffe_id, labels), sidecar
    if kind == "gateway":
        # An ingress listens for the outside unless its bootstrap says otherwise.
        host = _text(metadata, "tessera.host") or "0.0.0.0"  # noqa: S104
        try:
            offset = int(_text(metadata, "tessera.port_offset") or 0)
        except ValueError:
            raise ConfigError("tessera.port_offset must be a whole number") from None

        def gateway(view: Any, options: RenderOptions) -> Any:
            return render_gateway(view, host=host, port_offset=offset, options=options)

        return GatewayProxy(spiffe_id, labels), gateway
    if kind == "grpc":
        # A proxyless client sees what a sidecar's app may call; its Service is optional.
        provider = _text(metadata, "tessera.certificate_provider") or DEFAULT_CERTIFICATE_PROVIDER

        def grpc(view: Any, options: RenderOptions) -> Any:
            return render_proxyless(
                view, certificate_provider=None if provider == "none" else provider
            )

        return SidecarProxy(_text(metadata, "tessera.service"), spiffe_id, labels), grpc
    raise ConfigError(
        f"its bootstrap's node.metadata says tessera.proxy = {kind!r}; write the bootstrap "
        "with tessera sidecar run or tessera gateway run (sidecar or gateway), or set grpc "
        "for gRPC's own xDS client"
    )


def _text(metadata: Mapping[str, Any], key: str) -> str:
    value = metadata.get(key)
    return value if isinstance(value, str) else ""


def _labels(metadata: Mapping[str, Any]) -> dict[str, str]:
    text = _text(metadata, "tessera.labels") or "{}"
    try:
        labels = json.loads(text)
    except ValueError:
        raise ConfigError("tessera.labels must be a JSON object of strings") from None
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ConfigError("tessera.labels must be a JSON object of strings")
    if (problem := label_problem(labels)) is not None:
        raise ConfigError(problem)
    return labels


def _address(metadata: Mapping[str, Any], key: str) -> HostPort:
    text = _text(metadata, key)
    if not text:
        raise ConfigError(f"its bootstrap's node.metadata has no {key}")
    return HostPort.parse(text, what=key)
