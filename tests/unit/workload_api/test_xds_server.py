"""SDS and ADS on a real Unix socket, beside the Workload API, driven by a grpclib client.

What the caller is comes from ``FakeIdentityProvider`` (SVIDs the test CA made); what
it gets over ADS besides secrets from ``FakeResources``. Envoy itself is in
``tests/integration/test_envoy_discovery.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from grpclib.client import Channel, Stream
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

import workload_api
from tests.support.pki import TestCA, x509_svid_material
from tests.unit.workload_api.test_server import (
    FEDERATED,
    SECOND_ID,
    TRUST_DOMAIN,
    WORKLOAD_ID,
    FakeIdentityProvider,
    LoopThread,
)
from workload_api.identity import X509Context
from workload_api.proxy_rejections import rejections_report
from workload_api.server import SHUTTING_DOWN, WorkloadApiServer
from workload_api.xds import (
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
    AttestedProxy,
    DiscoveryStatus,
    NodeInfo,
    Resources,
    discovery_services,
)

T = TypeVar("T")

# The generated modules build their classes at import time, out of mypy's sight.
pb: Any = discovery_pb2
core: Any = base_pb2
tls: Any = secret_pb2

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
SDS = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"
FETCH = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets"
DELTA_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
NODE = {"id": "proxy-1", "cluster": "web"}
DEADLINE = 5.0


class FakeResources:
    """A ResourceSource holding what the test sets, for every node."""

    def __init__(self) -> None:
        self.current: dict[str, list[dict[str, Any]]] = {}
        self.asked: list[tuple[NodeInfo, AttestedProxy]] = []
        self._version = 0
        self._changed: asyncio.Event | None = None

    def resources(self, node: NodeInfo, proxy: AttestedProxy) -> Resources:
        self.asked.append((node, proxy))
        return self.current

    def version(self) -> int:
        return self._version

    async def wait_for_change(self, seen_version: int) -> int:
        while self._version == seen_version:
            await self._event().wait()
        return self._version

    async def replace(self, resources: dict[str, list[dict[str, Any]]]) -> None:
        self.current = resources
        self._version += 1
        changed, self._changed = self._event(), asyncio.Event()
        changed.set()

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed


class Xds:
    """The server on its loop thread, and what the tests reach through it."""

    def __init__(self, loop: LoopThread, provider: FakeIdentityProvider, socket_path: Path,
                 source: FakeResources, status: DiscoveryStatus,
                 server: WorkloadApiServer) -> None:  # fmt: skip
        self.loop, self.provider, self.socket_path = loop, provider, socket_path
        self.source, self.status, self.server = source, status, server

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coro, timeout=3 * DEADLINE)

    @asynccontextmanager
    async def stream(self, method: str = ADS) -> AsyncIterator[Stream[Any, Any]]:
        channel = Channel(path=str(self.socket_path))
        try:
            async with channel.request(
                method, Cardinality.STREAM_STREAM, pb.DiscoveryRequest, pb.DiscoveryResponse
            ) as stream:
                yield stream
                await stream.cancel()  # as Envoy leaves: it never ends its side
        finally:
            channel.close()


@pytest.fixture
def xds(test_ca: TestCA, partner_test_ca: TestCA, tmp_path: Path) -> Iterator[Xds]:
    loop = LoopThread()
    context = X509Context(
        svids=(x509_svid_material(test_ca, WORKLOAD_ID), x509_svid_material(test_ca, SECOND_ID)),
        federated_bundles={FEDERATED: partner_test_ca.bundle_der()},
    )
    provider = FakeIdentityProvider(context=context, own_ca=test_ca, federated_ca=partner_test_ca)
    source, status = FakeResources(), DiscoveryStatus()
    server = WorkloadApiServer(
        provider, shutdown_grace=DEADLINE,
        services=discovery_services(provider, "example.org", resources=source, status=status),
    )  # fmt: skip
    socket_path = tmp_path / "agent.sock"
    loop.run(server.start(socket_path))
    try:
        yield Xds(loop, provider, socket_path, source, status, server)
    finally:
        loop.run(server.close(), timeout=3 * DEADLINE)
        loop.stop()


def discovery_request(type_url: str, *names: str, nonce: str = "", version: str = "",
                      node: dict[str, str] | None = None, error: str | None = None) -> Any:
    request = pb.DiscoveryRequest(type_url=type_url, resource_names=list(names),
                                  response_nonce=nonce, version_info=version)  # fmt: skip
    if node is not None:
        request.node.CopyFrom(core.Node(**node))
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


async def receive(stream: Stream[Any, Any]) -> Any:
    return await asyncio.wait_for(stream.recv_message(), DEADLINE)


def secrets_of(response: Any) -> dict[str, Any]:
    found = {}
    for resource in response.resources:
        secret = tls.Secret()
        assert resource.Unpack(secret)
        found[secret.name] = secret
    return found


def leaf_serial(secret: Any) -> int:
    chain = secret.tls_certificate.certificate_chain.inline_bytes
    return x509.load_pem_x509_certificates(chain)[0].serial_number


def listener(name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": LISTENER_TYPE, "name": name, **fields}


# -- secrets ------------------------------------------------------------------------------


def test_secrets_over_ads_are_the_callers_own_and_a_rotation_is_pushed_at_once(
    xds: Xds, test_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workload_api.xds_server")
    someone_else = "spiffe://example.org/someone-else"

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with xds.stream() as stream:
            await stream.send_message(discovery_request(
                SECRET_TYPE, WORKLOAD_ID, "ALL", someone_else, node=NODE))  # fmt: skip
            first = await receive(stream)
            await stream.send_message(discovery_request(
                SECRET_TYPE, WORKLOAD_ID, "ALL", someone_else, nonce=first.nonce,
                version=first.version_info))  # fmt: skip
            rotated = X509Context(svids=(x509_svid_material(test_ca, WORKLOAD_ID),
                                         xds.provider.context.svids[1]),
                                  federated_bundles={})  # fmt: skip
            await xds.provider.replace(rotated)
            second = await receive(stream)
            assert second.version_info != first.version_info
            assert second.nonce != first.nonce
            return secrets_of(first), secrets_of(second)

    first, second = xds.run(scenario())
    assert sorted(first) == sorted(second) == ["ALL", WORKLOAD_ID]
    assert leaf_serial(second[WORKLOAD_ID]) != leaf_serial(first[WORKLOAD_ID])
    assert second[WORKLOAD_ID].tls_certificate.private_key.inline_bytes != (
        first[WORKLOAD_ID].tls_certificate.private_key.inline_bytes
    )
    assert set(xds.status.accepted("proxy-1")) == {SECRET_TYPE}
    refusals = [r.getMessage() for r in caplog.records
                if r.name == "workload_api.xds_server" and r.levelno == logging.INFO]  # fmt: skip
    assert refusals == [
        f"Envoy node proxy-1 (cluster web; pid {os.getpid()} (uid {os.getuid()}, gid "
        f"{os.getgid()})) asked for the secret {someone_else!r}, which it may not have (its "
        f"SVIDs: {WORKLOAD_ID}, {SECOND_ID}); it gets none until it may"
    ]  # once: again only if the caller's SVIDs became others


def test_the_sds_stream_without_names_gets_every_svid_and_bundle(xds: Xds) -> None:
    async def scenario() -> Any:
        async with xds.stream(SDS) as stream:
            await stream.send_message(discovery_request(SECRET_TYPE, node=NODE))
            return await receive(stream)

    response = xds.run(scenario())
    assert response.type_url == SECRET_TYPE
    assert sorted(secrets_of(response)) == sorted([WORKLOAD_ID, SECOND_ID, TRUST_DOMAIN,
                                                   FEDERATED])  # fmt: skip


def test_fetch_secrets_answers_once(xds: Xds) -> None:
    async def scenario() -> Any:
        channel = Channel(path=str(xds.socket_path))
        try:
            async with channel.request(
                FETCH, Cardinality.UNARY_UNARY, pb.DiscoveryRequest, pb.DiscoveryResponse
            ) as stream:
                await stream.send_message(discovery_request(SECRET_TYPE, "default", node=NODE),
                                          end=True)  # fmt: skip
                return await receive(stream)
        finally:
            channel.close()

    response = xds.run(scenario())
    assert list(secrets_of(response)) == ["default"]
    assert response.version_info


# -- resources from the source, ACK and NACK -------------------------------------------------


def test_listeners_come_from_the_source_and_a_change_is_pushed(
    xds: Xds, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> list[Any]:
        await xds.source.replace({LISTENER_TYPE: [listener("inbound")]})
        async with xds.stream() as stream:
            node = {**NODE}
            request = discovery_request(LISTENER_TYPE, node=node)
            request.node.metadata.update({"role": "sidecar"})
            await stream.send_message(request)
            first = await receive(stream)
            await stream.send_message(discovery_request(
                LISTENER_TYPE, nonce=first.nonce, version=first.version_info))  # fmt: skip
            await xds.source.replace({LISTENER_TYPE: [
                listener("inbound"), listener("outbound"),
                listener("broken", no_such_field=1),
                {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "x"},
            ]})  # fmt: skip
            second = await receive(stream)
            return [first, second]

    first, second = xds.run(scenario())
    assert len(first.resources) == 1
    assert len(second.resources) == 2  # the two listeners Envoy's API accepts
    assert xds.status.accepted("proxy-1") == {LISTENER_TYPE: first.version_info}
    node, proxy = xds.source.asked[-1]
    assert node == NodeInfo(id="proxy-1", cluster="web", metadata={"role": "sidecar"})
    assert proxy.peer.pid == os.getpid()
    assert proxy.spiffe_ids == (WORKLOAD_ID, SECOND_ID)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    described = f"for Envoy node proxy-1 (cluster web; pid {os.getpid()} (uid {os.getuid()}, " \
                f"gid {os.getgid()})) is not valid for Envoy's API, so the node does not get it"
    assert errors == [
        f"the Listener 'broken' ({LISTENER_TYPE}) {described}: Message type "
        '"envoy.config.listener.v3.Listener" has no field named "no_such_field" at "Listener".',
        f"the Listener 'x' ({LISTENER_TYPE}) {described}: its \"@type\" is "
        f"'type.googleapis.com/envoy.config.cluster.v3.Cluster', not {LISTENER_TYPE}",
    ]


def test_a_nack_is_logged_with_envoys_reason_and_kept_per_node_and_type(
    xds: Xds, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> Any:
        await xds.source.replace({LISTENER_TYPE: [listener("inbound")],
                                  ROUTE_TYPE: [{"@type": ROUTE_TYPE, "name": "http"}]})  # fmt: skip
        async with xds.stream() as stream:
            await stream.send_message(discovery_request(LISTENER_TYPE, node=NODE))
            first = await receive(stream)
            await stream.send_message(discovery_request(
                LISTENER_TYPE, nonce=first.nonce, error="malformed IP address: not-an-ip"))
            # Not sent again until they change: the next response is the routes asked for
            # next (listeners would go first, in the push order).
            await stream.send_message(discovery_request(ROUTE_TYPE, "http"))
            assert (await receive(stream)).type_url == ROUTE_TYPE
            return first

    first = xds.run(scenario())
    [rejection] = xds.status.rejections()
    assert (rejection.node_id, rejection.node_cluster, rejection.type_url) == (
        "proxy-1", "web", LISTENER_TYPE)  # fmt: skip
    assert (rejection.version, rejection.reason) == (
        first.version_info, "malformed IP address: not-an-ip")  # fmt: skip
    assert rejection.pid == os.getpid()
    assert xds.status.node("proxy-1")[LISTENER_TYPE].rejection == rejection
    assert xds.status.accepted("proxy-1") == {}
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (
        f"Envoy node proxy-1 (cluster web; pid {os.getpid()} (uid {os.getuid()}, gid "
        f"{os.getgid()})) refused {LISTENER_TYPE} version {first.version_info} (it keeps "
        "version none): malformed IP address: not-an-ip"
    )


SIDECAR_METADATA = {"tessera.proxy": "sidecar", "tessera.service": "users",
                    "tessera.labels": '{"version":"v1"}', "tessera.spiffe_id": WORKLOAD_ID}


def test_a_nack_stands_while_its_envoy_is_connected_and_no_later_ack_came(xds: Xds) -> None:
    """What the agent reports to the server (workload_api.proxy_rejections): the NACK with
    what the proxy's bootstrap says it is, until a later ACK or the proxy leaving."""
    changes: list[int] = []
    xds.status.on_change = lambda: changes.append(len(xds.status.current_rejections()))
    node = core.Node(id="proxy-1", cluster="users")
    node.metadata.update(SIDECAR_METADATA)

    async def until(standing: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while len(xds.status.current_rejections()) != standing:
                await asyncio.sleep(0.01)

    async def scenario() -> tuple[list[dict[str, Any]], str]:
        await xds.source.replace({LISTENER_TYPE: [listener("inbound")]})
        async with xds.stream() as stream:
            request = discovery_request(LISTENER_TYPE)
            request.node.CopyFrom(node)
            await stream.send_message(request)
            first = await receive(stream)
            await stream.send_message(discovery_request(
                LISTENER_TYPE, nonce=first.nonce, error="malformed IP address: localhost"))
            await until(1)
            reported = rejections_report(xds.status)
            await xds.source.replace({LISTENER_TYPE: [listener("inbound", stat_prefix="x")]})
            second = await receive(stream)
            await stream.send_message(discovery_request(
                LISTENER_TYPE, nonce=second.nonce, version=second.version_info))
            await until(0)  # accepted since: no longer standing
            await stream.send_message(discovery_request(
                LISTENER_TYPE, nonce=second.nonce, error="refused again"))
            await until(1)
        await until(0)  # its Envoy left
        return reported, first.version_info

    reported, refused_version = xds.run(scenario())
    assert changes == [1, 0, 1, 0]
    assert [r.reason for r in xds.status.rejections()] == ["refused again"]  # still kept
    [item] = reported
    assert item.pop("at")
    assert item == {
        "node_id": "proxy-1", "proxy": "sidecar", "service": "users",
        "labels": {"version": "v1"}, "spiffe_id": WORKLOAD_ID, "type_url": LISTENER_TYPE,
        "version": refused_version, "reason": "malformed IP address: localhost"}  # fmt: skip


# -- refusals and shutdown ------------------------------------------------------------------


@pytest.mark.parametrize(("node", "missing"), [
    (None, "id"), ({"cluster": "web"}, "id"), ({"id": "proxy-1"}, "cluster"),
])  # fmt: skip
def test_a_stream_whose_node_has_no_id_or_cluster_is_refused(
    xds: Xds, node: dict[str, str] | None, missing: str
) -> None:
    async def scenario() -> None:
        async with xds.stream() as stream:
            await stream.send_message(discovery_request(LISTENER_TYPE, node=node))
            await receive(stream)

    with pytest.raises(GRPCError) as refused:
        xds.run(scenario())
    assert refused.value.status == Status.INVALID_ARGUMENT
    assert refused.value.message == (
        f"the Envoy node has no {missing}: set node.id and node.cluster in Envoy's bootstrap, "
        "so the agent can tell its proxies apart"
    )


def test_a_request_naming_too_many_resources_ends_the_stream(xds: Xds) -> None:
    async def scenario() -> None:
        async with xds.stream() as stream:
            names = [f"cluster-{i}" for i in range(10_001)]
            await stream.send_message(discovery_request(SECRET_TYPE, *names, node=NODE))
            await receive(stream)

    with pytest.raises(GRPCError) as refused:
        xds.run(scenario())
    assert refused.value.status == Status.RESOURCE_EXHAUSTED
    assert refused.value.message == (
        "the request names 10001 resources, more than the 10000 the Tessera agent accepts in "
        "one request"
    )


def test_the_delta_variant_says_what_to_configure_instead(xds: Xds) -> None:
    async def scenario() -> None:
        channel = Channel(path=str(xds.socket_path))
        try:
            async with channel.request(DELTA_ADS, Cardinality.STREAM_STREAM,
                                       pb.DeltaDiscoveryRequest,
                                       pb.DeltaDiscoveryResponse) as stream:  # fmt: skip
                await stream.send_message(pb.DeltaDiscoveryRequest(type_url=LISTENER_TYPE))
                await receive(stream)
        finally:
            channel.close()

    with pytest.raises(GRPCError) as refused:
        xds.run(scenario())
    assert refused.value.status == Status.UNIMPLEMENTED
    assert refused.value.message == (
        "the Tessera agent serves xDS state of the world, not the incremental (delta) variant: "
        "set api_type: GRPC, not DELTA_GRPC, in Envoy's bootstrap"
    )


def test_closing_the_server_ends_open_streams_with_unavailable(xds: Xds) -> None:
    async def scenario() -> None:
        async with xds.stream() as stream:
            await stream.send_message(discovery_request(SECRET_TYPE, "default", node=NODE))
            await receive(stream)
            closing = asyncio.ensure_future(xds.server.close())
            try:
                await receive(stream)
            finally:
                await closing

    with pytest.raises(GRPCError) as ended:
        xds.run(scenario())
    assert (ended.value.status, ended.value.message) == (Status.UNAVAILABLE, SHUTTING_DOWN)


# -- without the envoy extra -----------------------------------------------------------------


def test_without_xds_protos_there_are_no_discovery_services_and_the_log_says_which_extra(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    test_ca: TestCA, partner_test_ca: TestCA,
) -> None:
    caplog.set_level(logging.INFO, logger="workload_api.xds")
    for module in ("xds_server", "xds_protocol", "sds"):
        monkeypatch.delitem(sys.modules, f"workload_api.{module}")
        monkeypatch.delattr(workload_api, module)
    for name in [n for n in sys.modules if n.split(".")[0] == "envoy"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "envoy.service", None)  # as if xds-protos were absent
    monkeypatch.setitem(sys.modules, "envoy.extensions", None)
    provider = FakeIdentityProvider(
        context=X509Context(svids=(), federated_bundles={}), own_ca=test_ca,
        federated_ca=partner_test_ca,
    )  # fmt: skip

    assert discovery_services(provider, "example.org") == []
    assert [r.getMessage() for r in caplog.records] == [
        "Envoy's discovery services (SDS, ADS) are off: the xds-protos package is not "
        "installed; install the envoy extra to serve Envoy: pip install 'tessera[envoy]'"
    ]
