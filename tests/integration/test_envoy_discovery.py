"""Envoy gets its certificates and its configuration from the Tessera agent (SDS, ADS).

A real server and agent, a real Envoy (``.venv/bin/envoy``) whose bootstrap reaches
the agent's socket, and this test process as the TLS client, with an SVID of its own
from the same agent. Envoy runs as this test's uid, so one entry for that uid gives
Envoy its SVID and another gives the client its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient

from tests.integration.agent_fixtures import (  # noqa: F401  (the fixtures register by import)
    AgentProcess,
    join_token,
    save_bundle,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import ServerProcess, free_port
from tests.integration.test_agent import create_entry
from tests.support.envoy import (
    EnvoyProcess,
    ads_config,
    agent_cluster,
    sds_from_agent,
    sds_over_ads,
)
from tests.support.processes import poll
from tests.unit.workload_api.test_server import LoopThread
from workload_api.agent import Agent
from workload_api.config import agent_config
from workload_api.server import WorkloadApiServer
from workload_api.xds import (
    LISTENER_TYPE,
    SECRET_TYPE,
    AttestedProxy,
    DiscoveryStatus,
    NodeInfo,
    Resources,
    discovery_services,
)

pytestmark = pytest.mark.integration

UID = os.getuid()
PROXY_ID = "spiffe://example.org/proxy"
CLIENT_ID = "spiffe://example.org/client"
NODE_ID = "proxy-1"
StartAgent = Callable[..., AgentProcess]
ECHO = {"name": "envoy.filters.network.echo",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.echo.v3."
                                  "Echo"}}  # fmt: skip


def tls_listener(name: str, port: int, certificate: dict[str, Any],
                 validation: dict[str, Any], *, address: str = "127.0.0.1") -> dict[str, Any]:
    """A listener that echoes over mTLS: its certificate and validation context from SDS."""
    return {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [{
            "filters": [ECHO],
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                             "DownstreamTlsContext",
                    "require_client_certificate": True,
                    "common_tls_context": {
                        "tls_certificate_sds_secret_configs": [certificate],
                        "validation_context_sds_secret_config": validation,
                    },
                },
            },
        }],
    }  # fmt: skip


def bootstrap(agent_socket: Path, **dynamic: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "node": {"id": NODE_ID, "cluster": "web"},
        "dynamic_resources": {"ads_config": ads_config(), **dynamic},
        "static_resources": {"clusters": [agent_cluster(agent_socket)], "listeners": []},
    }
    return document


# -- this test process as an mTLS client --------------------------------------------------


@dataclass
class TlsClient:
    context: ssl.SSLContext

    @classmethod
    def from_agent(cls, endpoint: str, directory: Path) -> TlsClient:
        """A client context with the client SVID and the trust domain's bundle."""
        with WorkloadApiClient(socket_path=endpoint, default_timeout=10) as client:
            fetched = client.fetch_x509_context()
        [svid] = [s for s in fetched.x509_svids if str(s.spiffe_id) == CLIENT_ID]
        bundle = fetched.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("example.org"))
        assert bundle is not None
        cert, key = directory / "client.pem", directory / "client.key"
        cert.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                  for c in svid.cert_chain))  # fmt: skip
        key.write_bytes(svid.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))  # fmt: skip
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # an SVID names a SPIFFE ID, checked below, not a host
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata="".join(
            c.public_bytes(serialization.Encoding.PEM).decode()
            for c in bundle.x509_authorities))  # fmt: skip
        context.load_cert_chain(cert, key)
        return cls(context)

    def connect(self, port: int) -> tuple[ssl.SSLSocket, x509.Certificate]:
        """An mTLS connection to Envoy (chain verified against the bundle) and its leaf."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            tls = self.context.wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
        return tls, leaf

    def handshake(self, port: int) -> x509.Certificate:
        """Connect, check the connection echoes, close; Envoy's leaf certificate."""
        tls, leaf = self.connect(port)
        with tls:
            assert echo(tls) == b"ping"
        return leaf


def echo(tls: ssl.SSLSocket) -> bytes:
    tls.sendall(b"ping")
    received = b""
    while len(received) < 4:
        chunk = tls.recv(4 - len(received))
        if not chunk:
            break
        received += chunk
    return received


def uri_sans(certificate: x509.Certificate) -> list[str]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.UniformResourceIdentifier)


def active_secrets(envoy: EnvoyProcess) -> dict[str, dict[str, Any]]:
    return {config["name"]: config for config in envoy.config_dump("dynamic_active_secrets")}


# -- SDS from `tessera agent run` ---------------------------------------------------------


def test_envoy_serves_mtls_with_its_svid_from_the_agent_and_rotates_it_without_dropping_connections(
    server: ServerProcess, start_agent: StartAgent, tmp_path: Path
) -> None:
    create_entry(server, PROXY_ID, f"unix:uid:{UID}", ttl="4s")
    create_entry(server, CLIENT_ID, f"unix:uid:{UID}")
    agent = start_agent(server)
    client = TlsClient.from_agent(agent.endpoint, tmp_path)
    port = free_port()
    document = bootstrap(agent.socket)
    # The certificate over ADS, the validation context over its own SDS stream: both ways.
    document["static_resources"]["listeners"] = [
        tls_listener("mtls", port, sds_over_ads(PROXY_ID), sds_from_agent("ALL"))
    ]

    with EnvoyProcess.start(tmp_path, document) as envoy:
        first = envoy.wait_until(lambda: client.handshake(port), "an mTLS handshake with Envoy")
        assert uri_sans(first) == [PROXY_ID]

        # Envoy accepted both secrets: they are active, with the agent's versions.
        def both_active() -> dict[str, dict[str, Any]] | None:
            found = active_secrets(envoy)
            return found if set(found) == {PROXY_ID, "ALL"} else None

        secrets = envoy.wait_until(both_active, "both secrets active in Envoy's config dump")
        assert all(secret["version_info"] for secret in secrets.values())
        validation = secrets["ALL"]["secret"]["validation_context"]
        validator = validation["custom_validator_config"]
        assert validator["name"] == "envoy.tls.cert_validator.spiffe"
        assert [td["name"] for td in validator["typed_config"]["trust_domains"]] == ["example.org"]

        # A rotation: new handshakes get the new SVID, a connection opened before goes on.
        opened_before, leaf = client.connect(port)
        with opened_before:
            assert echo(opened_before) == b"ping"

            def rotated() -> x509.Certificate | None:
                seen = client.handshake(port)
                return seen if seen.serial_number != leaf.serial_number else None

            renewed = envoy.wait_until(rotated, "a rotated certificate on a new handshake", 20)
            assert uri_sans(renewed) == [PROXY_ID]
            assert echo(opened_before) == b"ping"
        assert active_secrets(envoy)[PROXY_ID]["version_info"] != secrets[PROXY_ID]["version_info"]
    assert "Envoy's discovery services (SDS, ADS) are off" not in agent.log()


# -- ADS with a ResourceSource of the test's, on an agent in this process ------------------


class ListenersForTest:
    """A ResourceSource that gives every node the listeners the test sets."""

    def __init__(self) -> None:
        self.listeners: list[dict[str, Any]] = []
        self.asked: list[tuple[NodeInfo, AttestedProxy]] = []
        self._version = 0
        self._changed = asyncio.Event()

    def resources(self, node: NodeInfo, proxy: AttestedProxy) -> Resources:
        self.asked.append((node, proxy))
        return {LISTENER_TYPE: [{"@type": LISTENER_TYPE, **listener}
                                for listener in self.listeners]}  # fmt: skip

    def version(self) -> int:
        return self._version

    async def wait_for_change(self, seen_version: int) -> int:
        while self._version == seen_version:
            await self._changed.wait()
        return self._version

    async def replace(self, listeners: list[dict[str, Any]]) -> None:
        self.listeners = listeners
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


@dataclass
class InProcessAgent:
    loop: LoopThread
    agent: Agent
    source: ListenersForTest
    status: DiscoveryStatus
    socket: Path

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def replace(self, listeners: list[dict[str, Any]]) -> None:
        self.loop.run(self.source.replace(listeners))


@pytest.fixture
def in_process_agent(
    server: ServerProcess, tmp_path: Path, socket_dir: Path
) -> Iterator[InProcessAgent]:
    """An agent in this process (synced with the real server, on its own loop) serving the
    Workload API, SDS and ADS, with listeners from the test's source."""
    loop = LoopThread()
    config = agent_config({
        "trust_domain": "example.org", "server": [server.address],
        "data_dir": str(tmp_path / "agent"), "socket": str(socket_dir / "unused.sock"),
        "join_token": join_token(server, "spiffe://example.org/node/a"),
        "trust_bundle": str(save_bundle(server, tmp_path / "bundle.pem")), "health_bind": "0",
    }, environ={})  # fmt: skip
    agent = Agent(config, progress=logging.getLogger(__name__).info)
    source, status = ListenersForTest(), DiscoveryStatus()
    socket_path = socket_dir / "xds.sock"
    workload_api = WorkloadApiServer(
        agent, services=discovery_services(agent, "example.org", resources=source, status=status)
    )

    async def start() -> asyncio.Task[None]:
        await agent.start()
        await workload_api.start(socket_path)
        return asyncio.ensure_future(agent.sync_forever())

    async def stop(sync: asyncio.Task[None]) -> None:
        sync.cancel()
        await asyncio.gather(sync, return_exceptions=True)
        await workload_api.close()
        await agent._client.aclose()

    try:
        sync = loop.run(start(), timeout=30)
        try:
            yield InProcessAgent(loop, agent, source, status, socket_path)
        finally:
            loop.run(stop(sync), timeout=30)
    finally:
        loop.stop()


def test_envoy_acks_listeners_over_ads_and_a_nack_is_kept_with_envoys_reason(
    server: ServerProcess, in_process_agent: InProcessAgent, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    xds = in_process_agent
    create_entry(server, PROXY_ID, f"unix:uid:{UID}")
    create_entry(server, CLIENT_ID, f"unix:uid:{UID}")
    client = poll(lambda: TlsClient.from_agent(xds.endpoint, tmp_path), 20,
                  "the client SVID from the agent in this process")  # fmt: skip
    port = free_port()
    good = tls_listener("mtls", port, sds_over_ads(PROXY_ID), sds_over_ads("ALL"))
    xds.replace([good])
    document = bootstrap(xds.socket, lds_config={"ads": {}, "resource_api_version": "V3"})

    with EnvoyProcess.start(tmp_path, document) as envoy:
        leaf = envoy.wait_until(lambda: client.handshake(port), "mTLS on the listener from ADS")
        assert uri_sans(leaf) == [PROXY_ID]
        def acked() -> dict[str, str] | None:
            found = xds.status.accepted(NODE_ID)
            return found if {LISTENER_TYPE, SECRET_TYPE} <= set(found) else None

        accepted = envoy.wait_until(acked, "the agent seeing Envoy ACK the listener and secrets")
        node, proxy = xds.source.asked[-1]
        assert (node.id, node.cluster) == (NODE_ID, "web")
        assert node.user_agent == "envoy 1.40.0"
        assert PROXY_ID in proxy.spiffe_ids
        assert proxy.peer.pid == envoy.process.pid
        assert xds.status.rejections() == []

        # A listener Envoy refuses: the NACK is kept with Envoy's reason, and logged.
        broken = tls_listener("broken", free_port(), sds_over_ads(PROXY_ID), sds_over_ads("ALL"),
                              address="not-an-ip")  # fmt: skip
        xds.replace([good, broken])
        rejection = envoy.wait_until(lambda: next(iter(xds.status.rejections(NODE_ID)), None),
                                     "the agent seeing Envoy NACK the broken listener")  # fmt: skip
        assert (rejection.node_id, rejection.node_cluster) == (NODE_ID, "web")
        assert rejection.type_url == LISTENER_TYPE
        assert "malformed IP address: not-an-ip" in rejection.reason
        assert rejection.version != accepted[LISTENER_TYPE]
        assert rejection.pid == envoy.process.pid
        assert xds.status.accepted(NODE_ID)[LISTENER_TYPE] == accepted[LISTENER_TYPE]
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                     and "refused" in r.getMessage()]  # fmt: skip
        assert warning.startswith(f"Envoy node {NODE_ID} (cluster web; pid {envoy.process.pid} ")
        assert f"refused {LISTENER_TYPE} version {rejection.version}" in warning
        assert "malformed IP address: not-an-ip" in warning

        # Envoy goes on with the listener it accepted; a fixed configuration is taken.
        assert uri_sans(client.handshake(port)) == [PROXY_ID]
        xds.replace([good])
        envoy.wait_until(
            lambda: True if xds.status.accepted(NODE_ID)[LISTENER_TYPE] == accepted[LISTENER_TYPE]
            and xds.status.node(NODE_ID)[LISTENER_TYPE].accepted_at
            > rejection.at else None,
            "Envoy ACKing the listeners without the broken one",
        )
        assert xds.status.rejections(NODE_ID) == [rejection]  # kept for `mesh describe`
