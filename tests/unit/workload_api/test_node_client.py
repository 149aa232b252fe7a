"""The node API client: the server's SPIFFE ID is checked in the handshake; failover; backoff.

A small TLS server on a loopback port stands in for the Tessera server, so the
checks run against real handshakes.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain

from sdk.errors import PermissionDenied, Unavailable
from sdk.keys import KeyType, generate_private_key
from tests.unit.workload_api.agent_helpers import AuthorityForTests
from workload_api.config import Address
from workload_api.node_client import (
    AgentBanned,
    MeshUpdate,
    NodeClient,
    WrongTrustDomain,
    retry_backoff,
    server_id_problem,
)

T = TypeVar("T")
NOW = datetime.now(UTC)
TD = TrustDomain("example.org")
SERVER_ID = "spiffe://example.org/tessera/server"


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = retry_backoff(random.Random(1))
    delays = [backoff.next() for _ in range(8)]
    nominal = [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    same_seed = random.Random(1)
    assert delays == [cap * same_seed.uniform(0.5, 1.0) for cap in nominal]
    for delay, cap in zip(delays, nominal, strict=True):
        assert cap / 2 <= delay <= cap
    backoff.reset()
    assert backoff.next() <= 0.5


def test_backoff_outlasts_a_long_outage() -> None:
    # over an hour of an unreachable server: 2.0 ** 1024 would overflow a float
    backoff = retry_backoff(random.Random(2))
    delays = [backoff.next() for _ in range(1100)]
    assert all(2.5 <= delay <= 5.0 for delay in delays[4:])


def test_server_id_problem() -> None:
    authority = AuthorityForTests("example.org", NOW)
    key = generate_private_key(KeyType.EC_P256)
    good = authority.svid(SERVER_ID, key.public_key(), NOW).public_bytes(
        serialization.Encoding.DER
    )
    bad = authority.svid("spiffe://example.org/web", key.public_key(), NOW).public_bytes(
        serialization.Encoding.DER
    )
    assert server_id_problem(good, SERVER_ID) is None
    assert server_id_problem(bad, SERVER_ID) == (
        "the server presented spiffe://example.org/web instead of "
        "spiffe://example.org/tessera/server; it is not a Tessera server of this trust domain"
    )
    assert server_id_problem(None, SERVER_ID) == "the server presented no certificate"


class FakeServer:
    """A TLS server answering every request with one canned HTTP response."""

    def __init__(self, status: int, body: dict[str, object],
                 then: list[tuple[int, dict[str, object]]] | None = None) -> None:
        self.answers = [(status, body), *(then or [])]
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()
            return
        self.requests.append(head)
        length = int(next(
            (line.split(b":")[1] for line in head.split(b"\r\n")
             if line.lower().startswith(b"content-length:")), b"0"
        ))
        if length:
            await reader.readexactly(length)
        status, document = self.answers[min(len(self.requests), len(self.answers)) - 1]
        body = json.dumps(document).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()
        writer.close()


async def start_tls_server(
    tmp_path: Path, authority: AuthorityForTests, spiffe_id: str, fake: FakeServer
) -> tuple[asyncio.Server, int]:
    """A TLS server on a loopback port presenting an SVID for ``spiffe_id``."""
    key = generate_private_key(KeyType.EC_P256)
    cert = authority.svid(spiffe_id, key.public_key(), NOW)
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0, ssl=context)
    return server, int(server.sockets[0].getsockname()[1])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def test_an_imposter_gets_no_request(tmp_path: Path) -> None:
    authority = AuthorityForTests("example.org", NOW)
    fake = FakeServer(200, {"revision": 1, "entries": [], "entry_ids": []})

    async def scenario() -> str:
        imposter = "spiffe://example.org/imposter"
        server, port = await start_tls_server(tmp_path, authority, imposter, fake)
        client = NodeClient([Address("127.0.0.1", port)], TD)
        client.configure(anchors=(authority.certificate,), identity=None)
        try:
            with pytest.raises(Unavailable) as caught:
                await client.attest("join_token", {"token": "secret"}, b"csr", answer=dict)
            return caught.value.message
        finally:
            await client.aclose()
            server.close()

    message = run(scenario())
    assert message == (
        f"no Tessera server answered: 127.0.0.1:{message.split(':')[2]}: the server presented "
        "spiffe://example.org/imposter instead of spiffe://example.org/tessera/server; it is "
        "not a Tessera server of this trust domain"
    )
    assert fake.requests == [], "the join token must not reach a server that is not the server"


def test_fails_over_to_the_next_server_and_stays_there(tmp_path: Path) -> None:
    authority = AuthorityForTests("example.org", NOW)
    fake = FakeServer(200, {"revision": 3, "entries": [], "entry_ids": ["a"]})

    async def scenario() -> tuple[int, str, int]:
        server, port = await start_tls_server(tmp_path, authority, SERVER_ID, fake)
        client = NodeClient([Address("127.0.0.1", closed_port()), Address("127.0.0.1", port)], TD)
        client.configure(anchors=(authority.certificate,), identity=None)
        try:
            update = await client.entries(since=0, wait=0)
            return update.revision, str(client.server), port
        finally:
            await client.aclose()
            server.close()

    revision, current, port = run(scenario())
    assert revision == 3
    assert current == f"127.0.0.1:{port}"
    assert len(fake.requests) == 1


def test_a_server_from_another_trust_domain_is_refused(tmp_path: Path) -> None:
    ours = AuthorityForTests("example.org", NOW)
    theirs = AuthorityForTests("example.org", NOW)
    fake = FakeServer(200, {})

    async def scenario() -> str:
        server, port = await start_tls_server(tmp_path, theirs, SERVER_ID, fake)
        client = NodeClient([Address("127.0.0.1", port)], TD)
        client.configure(anchors=(ours.certificate,), identity=None)
        try:
            with pytest.raises(Unavailable) as caught:
                await client.bundles()
            return caught.value.message
        finally:
            await client.aclose()
            server.close()

    message = run(scenario())
    assert "its certificate does not chain to the trust bundle" in message
    assert "check that --trust-bundle is this trust domain's bundle" in message
    assert fake.requests == []


def test_refusals_carry_the_servers_sentence(tmp_path: Path) -> None:
    authority = AuthorityForTests("example.org", NOW)
    sentence = "agent spiffe://example.org/tessera/agent/join_token/x is banned"
    fake = FakeServer(403, {"error": {"code": "permission_denied", "message": sentence}})

    async def scenario() -> str:
        server, port = await start_tls_server(tmp_path, authority, SERVER_ID, fake)
        client = NodeClient([Address("127.0.0.1", port)], TD)
        client.configure(anchors=(authority.certificate,), identity=None)
        try:
            with pytest.raises(PermissionDenied) as caught:
                await client.bundles()
            return caught.value.message
        finally:
            await client.aclose()
            server.close()

    assert run(scenario()) == sentence


def test_a_refused_challenge_answer_restarts_the_attestation_once(tmp_path: Path) -> None:
    authority = AuthorityForTests("example.org", NOW)
    foreign: dict[str, object] = {"error": {
        "code": "unauthenticated",
        "message": "the x509pop challenge was issued by another server process",
    }}
    fake = FakeServer(200, {"challenge": {"nonce": "1"}}, then=[
        (401, foreign),
        (200, {"challenge": {"nonce": "2"}}),
        (200, {"spiffe_id": "spiffe://example.org/tessera/agent/x509pop/ab"}),
    ])
    answered: list[dict[str, object]] = []

    def answer(challenge: object) -> dict[str, object]:
        answered.append(dict(challenge))  # type: ignore[call-overload]
        return {"signature": "s"}

    async def scenario() -> dict[str, Any]:
        server, port = await start_tls_server(tmp_path, authority, SERVER_ID, fake)
        client = NodeClient([Address("127.0.0.1", port)], TD)
        client.configure(anchors=(authority.certificate,), identity=None)
        try:
            return await client.attest("x509pop", {"certificates": []}, b"csr", answer=answer)
        finally:
            await client.aclose()
            server.close()

    assert run(scenario()) == {"spiffe_id": "spiffe://example.org/tessera/agent/x509pop/ab"}
    assert answered == [{"nonce": "1"}, {"nonce": "2"}]
    assert len(fake.requests) == 4


def test_a_ban_is_told_apart_from_other_refusals(tmp_path: Path) -> None:
    authority = AuthorityForTests("example.org", NOW)
    sentence = "agent spiffe://example.org/tessera/agent/join_token/x is banned"
    fake = FakeServer(403, {"error": {"code": "agent_banned", "message": sentence}})

    async def scenario() -> PermissionDenied:
        server, port = await start_tls_server(tmp_path, authority, SERVER_ID, fake)
        client = NodeClient([Address("127.0.0.1", port)], TD)
        client.configure(anchors=(authority.certificate,), identity=None)
        try:
            with pytest.raises(PermissionDenied) as caught:
                await client.entries(since=0, wait=0)
            return caught.value
        finally:
            await client.aclose()
            server.close()

    refusal = run(scenario())
    assert isinstance(refusal, AgentBanned)
    assert refusal.message == sentence


def test_the_server_of_another_trust_domain_is_a_configuration_error(tmp_path: Path) -> None:
    theirs = AuthorityForTests("other.test", NOW)
    fake = FakeServer(200, {})

    async def scenario() -> tuple[str, int]:
        server, port = await start_tls_server(
            tmp_path, theirs, "spiffe://other.test/tessera/server", fake
        )
        # Two addresses: the call does not move on to the next one, it stops at once.
        client = NodeClient([Address("127.0.0.1", port), Address("127.0.0.1", closed_port())], TD)
        client.configure(anchors=None, identity=None)  # --insecure-bootstrap
        try:
            with pytest.raises(WrongTrustDomain) as caught:
                await client.attest("join_token", {"token": "secret"}, b"csr", answer=dict)
            return caught.value.message, port
        finally:
            await client.aclose()
            server.close()

    message, port = run(scenario())
    assert message == (
        f"the server at 127.0.0.1:{port} serves trust domain other.test, not example.org; "
        "check --trust-domain (and --server)"
    )
    assert fake.requests == [], "the join token must not reach another trust domain's server"


def test_the_mesh_changes_and_the_mesh_revision_are_read_from_the_answers(
    tmp_path: Path,
) -> None:
    authority = AuthorityForTests("example.org", NOW)
    document = {"apiVersion": "tessera.io/v1alpha1", "kind": "Service",
                "metadata": {"name": "users"}, "spec": {}}
    fake = FakeServer(200, {"revision": 3, "entries": [], "entry_ids": [], "mesh_revision": 7},
                      then=[
        (200, {"revision": 7, "full": False,
               "resources": [{"kind": "Service", "name": "users", "revision": 7,
                              "document": document}],
               "deleted": [{"kind": "VirtualService", "name": "users", "revision": 6}]}),
        (200, {"revision": 7, "full": False, "resources": [{"kind": "Service"}],
               "deleted": []}),
    ])

    async def scenario() -> tuple[Any, Any, str]:
        server, port = await start_tls_server(tmp_path, authority, SERVER_ID, fake)
        client = NodeClient([Address("127.0.0.1", port)], TD)
        client.configure(anchors=(authority.certificate,), identity=None)
        try:
            entries = await client.entries(since=3, wait=0, mesh_revision=5)
            changes = await client.mesh_changes(since=5)
            with pytest.raises(Unavailable) as malformed:
                await client.mesh_changes(since=5)
            return entries, changes, malformed.value.message
        finally:
            await client.aclose()
            server.close()

    entries, changes, malformed = run(scenario())
    assert entries.mesh_revision == 7
    assert fake.requests[0].startswith(b"GET /v1/agent/entries?since=3&mesh=5 ")
    assert fake.requests[1].startswith(b"GET /v1/agent/mesh?since=5 ")
    assert changes == MeshUpdate(
        revision=7, full=False,
        resources=({"kind": "Service", "name": "users", "revision": 7, "document": document},),
        deleted=(("VirtualService", "users"),))
    assert malformed == (
        "the server sent a malformed mesh answer: a resource without its document")
