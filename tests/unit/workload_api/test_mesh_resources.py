"""Each Envoy's view of the mesh, as the agent renders it for ADS: chosen by the Envoy's
node metadata, allowed only for an identity the Envoy process holds."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from attestor.selector import Selector
from attestor.workload import PeerCredentials
from mesh import parse_documents
from mesh.catalog import Instance
from mesh.envoy import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER
from sdk.address import HostPort
from tests.unit.mesh.documents import MISSION, USERS_SERVICE
from workload_api.mesh_resources import MeshResourceSource
from workload_api.mesh_sync import MeshState
from workload_api.node_client import MeshUpdate
from workload_api.xds import AttestedProxy, NodeInfo

GATEWAY_ID = "spiffe://example.org/gateway"
USERS_ID = "spiffe://example.org/users"
WEB_ID = "spiffe://example.org/web"
CALLER = PeerCredentials(pid=4242, uid=1000, gid=1000)


def mesh() -> MeshState:
    state = MeshState()
    resources = tuple(
        {"kind": r.KIND, "name": r.name, "document": r.to_document()}
        for r in parse_documents(USERS_SERVICE + "---\n" + MISSION, source="mesh.yaml")
    )
    users = Instance("users-service", HostPort("10.0.0.5", 15006), "spiffe://example.org/a",
                     {}, "healthy", datetime(2030, 1, 1, tzinfo=UTC), USERS_ID)
    state.apply(MeshUpdate(revision=3, full=True, deleted=(), resources=resources,
                           instances=(users,)))
    return state


def attested(*spiffe_ids: str) -> AttestedProxy:
    return AttestedProxy(CALLER, frozenset(), spiffe_ids)


def names(resources: dict[str, list[dict[str, object]]], type_url: str) -> list[object]:
    key = "cluster_name" if type_url == CLUSTER_LOAD_ASSIGNMENT else "name"
    return [resource[key] for resource in resources.get(type_url, [])]


def test_a_gateway_gets_the_missions_listener_and_the_users_service_endpoints() -> None:
    source = MeshResourceSource(mesh())
    node = NodeInfo("gw-1", "ingress", {"tessera.proxy": "gateway",
                                        "tessera.labels": json.dumps({"istio": "ingressgateway"}),
                                        "tessera.host": "127.0.0.1",
                                        "tessera.port_offset": "18000"})
    resources = dict(source.resources(node, attested(GATEWAY_ID)))
    [listener] = resources[LISTENER]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18080}
    assert names(resources, CLUSTER) == ["outbound|80||users-service"]
    [assignment] = resources[CLUSTER_LOAD_ASSIGNMENT]
    endpoint = assignment["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert endpoint["socket_address"] == {"address": "10.0.0.5", "port_value": 15006}
    assert source.resources(node, attested(GATEWAY_ID)) is source.resources(
        node, attested(GATEWAY_ID))  # rendered once per revision


def test_a_sidecar_gets_its_inbound_and_outbound_listeners() -> None:
    source = MeshResourceSource(mesh())
    node = NodeInfo("users-1", "users-service", {
        "tessera.proxy": "sidecar", "tessera.service": "users-service",
        "tessera.inbound": "0.0.0.0:15006", "tessera.app": "127.0.0.1:8080",
        "tessera.outbound": "127.0.0.1:15001"})
    resources = dict(source.resources(node, attested(USERS_ID)))
    assert sorted(names(resources, LISTENER)) == ["inbound", "outbound"]


def test_a_proxyless_grpc_client_gets_a_listener_per_target_and_mtls_by_its_provider() -> None:
    source = MeshResourceSource(mesh())
    node = NodeInfo("web-1", "web", {"tessera.proxy": "grpc",
                                     "tessera.certificate_provider": "svid"})
    resources = dict(source.resources(node, attested(WEB_ID)))
    assert names(resources, LISTENER) == ["users-service", "users-service:80"]
    [cluster] = resources[CLUSTER]
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificate_provider_instance"] == {"instance_name": "svid"}
    plain = NodeInfo("web-2", "web", {"tessera.proxy": "grpc",
                                      "tessera.certificate_provider": "none"})
    [cluster] = dict(source.resources(plain, attested(WEB_ID)))[CLUSTER]
    assert "transport_socket" not in cluster


@pytest.mark.parametrize(("metadata", "spiffe_ids", "reason"), [
    ({"tessera.proxy": "gateway", "tessera.spiffe_id": USERS_ID}, (GATEWAY_ID,),
     f"its bootstrap names {USERS_ID}, an SVID the Envoy process does not hold"),
    ({"tessera.proxy": "gateway"}, (),
     "the Envoy process holds no SVID"),
    ({"tessera.proxy": "grpc", "tessera.spiffe_id": USERS_ID}, (WEB_ID,),
     f"its bootstrap names {USERS_ID}, an SVID the Envoy process does not hold"),
    ({"tessera.proxy": "router"}, (GATEWAY_ID,),
     "its bootstrap's node.metadata says tessera.proxy = 'router'"),
    ({"tessera.proxy": "sidecar", "tessera.service": "users-service"}, (USERS_ID,),
     "its bootstrap's node.metadata has no tessera.inbound"),
    ({"tessera.proxy": "gateway", "tessera.labels": "[1]"}, (GATEWAY_ID,),
     "tessera.labels must be a JSON object of strings"),
    ({"tessera.proxy": "sidecar", "tessera.service": "users-service",
      "tessera.inbound": "localhost:15006", "tessera.app": "127.0.0.1:8080"}, (USERS_ID,),
     "the inbound listener's address localhost:15006 must be an IP address"),
])
def test_an_envoy_that_is_not_what_it_says_gets_nothing_and_the_log_says_why(
    metadata: dict[str, str], spiffe_ids: tuple[str, ...], reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = MeshResourceSource(mesh())
    node = NodeInfo("envoy-1", "x", metadata)
    with caplog.at_level(logging.WARNING, logger="workload_api.mesh_resources"):
        assert source.resources(node, attested(*spiffe_ids)) == {}
        assert source.resources(node, attested(*spiffe_ids)) == {}
    [record] = caplog.records  # once per node and reason
    assert record.getMessage().startswith(f"Envoy envoy-1 gets no mesh configuration: {reason}")


# -- JWT bundles ----------------------------------------------------------------------------

EDGE_JWT = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: edge-jwt}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  jwtRules:
  - issuer: spiffe://example.org
    audiences: [edge]
"""
GATEWAY_NODE = NodeInfo("gw-1", "ingress", {
    "tessera.proxy": "gateway", "tessera.labels": json.dumps({"istio": "ingressgateway"})})
SELECTORS = frozenset({Selector("unix", "uid:1000")})


def jwks(kid: str) -> bytes:
    return json.dumps({"keys": [{"kty": "EC", "kid": kid, "crv": "P-256", "use": "jwt-svid",
                                 "x": "x", "y": "y"}]}).encode()  # fmt: skip


class Bundles:
    """The agent's side: JWT bundles by trust domain ID, and a version that moves."""

    def __init__(self) -> None:
        self.bundles = {"spiffe://example.org": jwks("key-1")}
        self.asked: list[frozenset[Selector]] = []
        self._version = 0
        self._changed = asyncio.Event()

    def jwt_bundles(self, selectors: frozenset[Selector]) -> dict[str, bytes]:
        self.asked.append(selectors)
        return dict(self.bundles)

    def version(self) -> int:
        return self._version

    async def wait_for_change(self, seen_version: int) -> int:
        while self._version == seen_version:
            await self._changed.wait()
        return self._version

    def change(self, bundles: dict[str, bytes] | None = None) -> None:
        if bundles is not None:
            self.bundles = bundles
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def jwt_mesh() -> MeshState:
    state = mesh()
    resources = tuple(
        {"kind": r.KIND, "name": r.name, "document": r.to_document()}
        for r in parse_documents(EDGE_JWT, source="jwt.yaml")
    )
    state.apply(MeshUpdate(revision=4, full=False, deleted=(), resources=resources,
                           instances=()))  # fmt: skip
    return state


def provider_keys(resources: Any) -> str:
    [listener] = resources[LISTENER]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    jwt_filter = next(item for item in manager["http_filters"]
                      if item["name"] == "envoy.filters.http.jwt_authn")  # fmt: skip
    [provider] = jwt_filter["typed_config"]["providers"].values()
    return str(provider["local_jwks"]["inline_string"])


def test_a_gateway_checks_jwt_svids_with_the_bundles_its_selectors_see() -> None:
    bundles = Bundles()
    source = MeshResourceSource(jwt_mesh(), bundles=bundles)
    proxy = AttestedProxy(CALLER, SELECTORS, (GATEWAY_ID,))
    assert provider_keys(source.resources(GATEWAY_NODE, proxy)) == jwks("key-1").decode()
    assert bundles.asked[-1] == SELECTORS


def test_without_bundles_a_trust_domains_rule_is_left_out() -> None:
    resources = MeshResourceSource(jwt_mesh()).resources(GATEWAY_NODE, attested(GATEWAY_ID))
    [listener] = resources[LISTENER]
    assert "jwt_authn" not in json.dumps(listener)


def test_a_rotated_jwt_key_moves_the_version_and_is_rendered() -> None:
    bundles = Bundles()
    source = MeshResourceSource(jwt_mesh(), bundles=bundles)
    proxy = AttestedProxy(CALLER, SELECTORS, (GATEWAY_ID,))

    async def scenario() -> None:
        seen = source.version()
        first = source.resources(GATEWAY_NODE, proxy)
        assert source.version() == seen  # nothing changed
        waiting = asyncio.ensure_future(source.wait_for_change(seen))
        await asyncio.sleep(0)
        assert not waiting.done()

        bundles.change({"spiffe://example.org": jwks("key-2")})
        version = await asyncio.wait_for(waiting, 5)
        assert version != seen
        assert provider_keys(source.resources(GATEWAY_NODE, proxy)) == jwks("key-2").decode()

        bundles.change()  # another SVID, the same bundles: the same render
        assert source.version() != version
        assert source.resources(GATEWAY_NODE, proxy) is source.resources(GATEWAY_NODE, proxy)
        assert first is not source.resources(GATEWAY_NODE, proxy)

    asyncio.run(scenario())


def test_the_version_moves_with_the_mesh_too() -> None:
    state = mesh()
    source = MeshResourceSource(state, bundles=Bundles())

    async def scenario() -> None:
        seen = source.version()
        waiting = asyncio.ensure_future(source.wait_for_change(seen))
        await asyncio.sleep(0)
        assert not waiting.done()
        resources = tuple(
            {"kind": r.KIND, "name": r.name, "document": r.to_document()}
            for r in parse_documents(EDGE_JWT, source="jwt.yaml")
        )
        state.apply(MeshUpdate(revision=4, full=False, deleted=(), resources=resources,
                               instances=()))  # fmt: skip
        assert await asyncio.wait_for(waiting, 5) != seen

    asyncio.run(scenario())
