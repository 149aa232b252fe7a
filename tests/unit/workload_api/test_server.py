"""The Workload API server on a real Unix socket, driven by the real ``spiffe`` clients.

The server runs on its own event loop in a background thread (py-spiffe's
clients are synchronous and block on grpcio). What it serves comes from
``FakeIdentityProvider``, which holds SVIDs minted by the test CA (``tests/support/pki.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped]
import h2.config
import h2.connection
import h2.errors
import h2.events
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.metadata import decode_grpc_message
from prometheus_client import REGISTRY
from spiffe import SpiffeId, TrustDomain, WorkloadApiClient, X509Source
from spiffe.workloadapi.errors import FetchJwtSvidError, FetchX509SvidError, ValidateJwtSvidError

import workload_api.server as server_module
from attestor.selector import Selector
from attestor.workload import PeerCredentials
from sdk.errors import ConfigError, InvalidArgument, Unavailable
from tests.support.pki import TestCA, x509_svid_material
from workload_api._proto import workload_grpc, workload_pb2
from workload_api.grpc_limits import MAX_MESSAGE_BYTES, ServerLimits
from workload_api.identity import (
    JwtSvidMaterial,
    ValidatedToken,
    X509Context,
)
from workload_api.server import (
    SECURITY_HEADER,
    SHUTTING_DOWN,
    WorkloadApiServer,
    _WorkloadApiService,
)

T = TypeVar("T")

# Message classes are built at import time, out of mypy's sight.
pb: Any = workload_pb2

TRUST_DOMAIN = "spiffe://example.org"
FEDERATED = "spiffe://partner.test"
WORKLOAD_ID = "spiffe://example.org/workload"
SECOND_ID = "spiffe://example.org/second"
JWT_KID = "tessera-test-key"
HEADER = {"workload.spiffe.io": "true"}
DEADLINE_SECONDS = 5.0


def _serial(svid_der: bytes) -> int:
    return x509.load_der_x509_certificate(svid_der).serial_number


# -- the fake provider --------------------------------------------------------------------


@dataclass
class FakeIdentityProvider:
    """An IdentityProvider holding fixed material; tests swap it with :meth:`replace`.

    Everything runs on the server's loop except the constructor; tests call
    ``replace`` through ``LoopThread.run``.
    """

    context: X509Context
    own_ca: TestCA
    federated_ca: TestCA
    jwt_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    peers: list[PeerCredentials] = field(default_factory=list)
    context_reads: int = 0
    jwt_requests: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)
    _version: int = 0
    _changed: asyncio.Condition | None = None

    async def attest(self, peer: PeerCredentials) -> frozenset[Selector]:
        self.peers.append(peer)
        return frozenset({Selector("unix", f"uid:{peer.uid}")})

    def x509_context(self, selectors: frozenset[Selector]) -> X509Context:
        self.context_reads += 1
        return self.context

    def x509_bundles(self, selectors: frozenset[Selector]) -> Mapping[str, bytes]:
        return {TRUST_DOMAIN: self.own_ca.bundle_der(), FEDERATED: self.federated_ca.bundle_der()}

    def jwt_bundles(self, selectors: frozenset[Selector]) -> Mapping[str, bytes]:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.jwt_key.public_key()))
        jwk.update({"kid": JWT_KID, "use": "jwt-svid"})
        return {TRUST_DOMAIN: json.dumps({"keys": [jwk]}).encode()}

    async def fetch_jwt_svids(
        self, selectors: frozenset[Selector], audience: Sequence[str], spiffe_id: str | None
    ) -> list[JwtSvidMaterial]:
        self.jwt_requests.append((tuple(audience), spiffe_id))
        ids = [spiffe_id] if spiffe_id else [svid.spiffe_id for svid in self.context.svids]
        return [JwtSvidMaterial(spiffe_id=i, token=self.mint_jwt(i, audience)) for i in ids]

    def mint_jwt(self, spiffe_id: str, audience: Sequence[str]) -> str:
        now = int(time.time())
        claims = {"sub": spiffe_id, "aud": list(audience), "iat": now, "exp": now + 300}
        return jwt.encode(
            claims, self.jwt_key, algorithm="ES256", headers={"kid": JWT_KID, "typ": "JWT"}
        )

    def validate_jwt_svid(self, token: str, audience: str) -> ValidatedToken:
        try:
            claims = jwt.decode(
                token, self.jwt_key.public_key(), algorithms=["ES256"], audience=audience
            )
        except jwt.InvalidTokenError as err:
            raise InvalidArgument(f"JWT-SVID is not valid: {err}") from err
        return ValidatedToken(spiffe_id=claims["sub"], claims=claims)

    def version(self) -> int:
        return self._version

    async def wait_for_change(self, seen_version: int) -> int:
        async with self._condition():
            await self._condition().wait_for(lambda: self._version != seen_version)
            return self._version

    async def replace(self, context: X509Context) -> None:
        async with self._condition():
            self.context = context
            self._version += 1
            self._condition().notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed


# -- the server on its own loop -----------------------------------------------------------


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = DEADLINE_SECONDS) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_leftovers() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(DEADLINE_SECONDS)
        self.loop.close()


@dataclass
class RunningServer:
    loop: LoopThread
    server: WorkloadApiServer
    provider: FakeIdentityProvider
    socket_path: Path
    ca: TestCA

    @property
    def address(self) -> str:
        return f"unix://{self.socket_path}"

    def client(self) -> WorkloadApiClient:
        return WorkloadApiClient(socket_path=self.address, default_timeout=DEADLINE_SECONDS)

    def replace(self, context: X509Context) -> None:
        self.loop.run(self.provider.replace(context))

    def grpclib(
        self, call: Callable[[workload_grpc.SpiffeWorkloadAPIStub], Coroutine[Any, Any, T]]
    ) -> T:
        """Run ``call`` with a grpclib stub on the server's loop (for what py-spiffe can't send)."""

        async def with_channel() -> T:
            channel = Channel(path=str(self.socket_path))
            try:
                return await call(workload_grpc.SpiffeWorkloadAPIStub(channel))
            finally:
                channel.close()

        return self.loop.run(with_channel())


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.stop()


@pytest.fixture
def provider(test_ca: TestCA, partner_test_ca: TestCA) -> FakeIdentityProvider:
    context = X509Context(
        svids=(x509_svid_material(test_ca, WORKLOAD_ID),
               x509_svid_material(test_ca, SECOND_ID, hint="second")),
        federated_bundles={FEDERATED: partner_test_ca.bundle_der()},
    )  # fmt: skip
    return FakeIdentityProvider(context=context, own_ca=test_ca, federated_ca=partner_test_ca)


def _start(
    loop: LoopThread, provider: FakeIdentityProvider, socket_path: Path
) -> WorkloadApiServer:
    server = WorkloadApiServer(provider, shutdown_grace=DEADLINE_SECONDS)
    loop.run(server.start(socket_path))
    return server


@pytest.fixture
def running(
    loop_thread: LoopThread, provider: FakeIdentityProvider, test_ca: TestCA, tmp_path: Path
) -> Iterator[RunningServer]:
    socket_path = tmp_path / "run" / "agent.sock"
    server = _start(loop_thread, provider, socket_path)
    yield RunningServer(loop_thread, server, provider, socket_path, test_ca)
    loop_thread.run(server.close())


def _rpc_status(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status behind a py-spiffe error."""
    call = error.__cause__
    assert isinstance(call, grpc.Call), f"{error!r} was not caused by a gRPC error"
    return call.code(), call.details()


def _calls(method: str, status: str) -> float:
    value = REGISTRY.get_sample_value(
        "tessera_workload_api_calls_total", {"method": method, "status": status}
    )
    return value or 0.0


# -- py-spiffe against the server ---------------------------------------------------------


def test_fetch_x509_svid_returns_the_default_svid(running: RunningServer) -> None:
    with running.client() as client:
        svid = client.fetch_x509_svid()
        svids = client.fetch_x509_svids()

    assert svid.spiffe_id == SpiffeId(WORKLOAD_ID)
    assert svid.leaf.serial_number == _serial(running.provider.context.svids[0].cert_chain_der)
    assert [s.spiffe_id for s in svids] == [SpiffeId(WORKLOAD_ID), SpiffeId(SECOND_ID)]


def test_fetch_x509_context_has_svids_and_every_bundle(running: RunningServer) -> None:
    with running.client() as client:
        context = client.fetch_x509_context()

    assert context.default_svid.spiffe_id == SpiffeId(WORKLOAD_ID)
    own = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("example.org"))
    partner = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("partner.test"))
    assert own is not None and own.x509_authorities == {running.ca.certificate}
    assert partner is not None
    assert partner.x509_authorities == {running.provider.federated_ca.certificate}


def test_fetch_x509_bundles(running: RunningServer) -> None:
    with running.client() as client:
        bundles = client.fetch_x509_bundles()

    assert {b.trust_domain for b in bundles.bundles} == {
        TrustDomain("example.org"),
        TrustDomain("partner.test"),
    }


def test_fetch_jwt_svid_for_an_audience(running: RunningServer) -> None:
    before = _calls("FetchJWTSVID", "OK")
    with running.client() as client:
        svid = client.fetch_jwt_svid(audience={"db"})
        chosen = client.fetch_jwt_svid(audience={"db"}, subject=SpiffeId(SECOND_ID))

    assert svid.spiffe_id == SpiffeId(WORKLOAD_ID)
    assert svid.audience == {"db"}
    assert chosen.spiffe_id == SpiffeId(SECOND_ID)
    assert running.provider.jwt_requests == [(("db",), None), (("db",), SECOND_ID)]
    assert _calls("FetchJWTSVID", "OK") == before + 2


def test_fetch_jwt_svid_for_an_identity_the_caller_lacks(running: RunningServer) -> None:
    with running.client() as client, pytest.raises(FetchJwtSvidError) as caught:
        client.fetch_jwt_svid(audience={"db"}, subject=SpiffeId("spiffe://example.org/other"))

    assert _rpc_status(caught.value) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "no identity issued for spiffe://example.org/other",
    )
    assert running.provider.jwt_requests == []


def test_fetch_jwt_bundles(running: RunningServer) -> None:
    with running.client() as client:
        bundles = client.fetch_jwt_bundles()

    bundle = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
    assert bundle is not None
    assert set(bundle.jwt_authorities) == {JWT_KID}


def test_validate_jwt_svid(running: RunningServer) -> None:
    token = running.provider.mint_jwt(WORKLOAD_ID, ["db"])
    with running.client() as client:
        validated = client.validate_jwt_svid(token, "db")
        with pytest.raises(ValidateJwtSvidError) as caught:
            client.validate_jwt_svid(token, "cache")

    assert validated.spiffe_id == SpiffeId(WORKLOAD_ID)
    assert _rpc_status(caught.value) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "JWT-SVID is not valid: Audience doesn't match",
    )


def test_validate_jwt_svid_returns_the_claims(running: RunningServer) -> None:
    token = running.provider.mint_jwt(WORKLOAD_ID, ["db"])

    async def validate(stub: workload_grpc.SpiffeWorkloadAPIStub) -> Any:
        request = pb.ValidateJWTSVIDRequest(audience="db", svid=token)
        return await stub.ValidateJWTSVID(request, metadata=HEADER)

    response = running.grpclib(validate)

    assert response.spiffe_id == WORKLOAD_ID
    assert response.claims["sub"] == WORKLOAD_ID
    assert list(response.claims["aud"]) == ["db"]


def test_x509_source_follows_a_rotation(running: RunningServer) -> None:
    updated = threading.Event()
    source = X509Source(socket_path=running.address, timeout_in_seconds=DEADLINE_SECONDS)
    try:
        source.subscribe_for_updates(updated.set)
        first = source.get_x509_context().default_svid
        rotated = x509_svid_material(running.ca, WORKLOAD_ID)
        running.replace(X509Context(svids=(rotated,), federated_bundles={}))

        def current_serial() -> int:
            return int(source.get_x509_context().default_svid.leaf.serial_number)

        deadline = time.monotonic() + DEADLINE_SECONDS
        while current_serial() != _serial(rotated.cert_chain_der):
            assert time.monotonic() < deadline, "the X509Source never saw the rotated SVID"
            updated.wait(0.05)
            updated.clear()
    finally:
        source.close()

    assert first.leaf.serial_number != _serial(rotated.cert_chain_der)


# -- what py-spiffe never sends -----------------------------------------------------------


def test_a_request_without_the_security_header_is_refused(running: RunningServer) -> None:
    before = _calls("FetchJWTSVID", "INVALID_ARGUMENT")

    async def without_header(stub: workload_grpc.SpiffeWorkloadAPIStub) -> GRPCError:
        with pytest.raises(GRPCError) as caught:
            await stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["db"]))
        return caught.value

    error = running.grpclib(without_header)

    assert (error.status, error.message) == (
        Status.INVALID_ARGUMENT,
        "security header missing from request",
    )
    assert running.provider.peers == []  # refused before attestation
    assert _calls("FetchJWTSVID", "INVALID_ARGUMENT") == before + 1


@pytest.mark.parametrize(
    ("method", "request_message", "message"),
    [
        ("FetchJWTSVID", pb.JWTSVIDRequest(), "audience must be specified"),
        (
            "ValidateJWTSVID",
            pb.ValidateJWTSVIDRequest(svid="x"),
            "audience must be specified",
        ),
        (
            "ValidateJWTSVID",
            pb.ValidateJWTSVIDRequest(audience="db"),
            "svid must be specified",
        ),
        (
            "FetchJWTSVID",
            pb.JWTSVIDRequest(audience=["db"], spiffe_id="spiffe://Example.org/x"),
            "requested SPIFFE ID 'spiffe://Example.org/x' is not valid",
        ),
    ],
)
def test_missing_arguments_are_invalid(
    running: RunningServer, method: str, request_message: Any, message: str
) -> None:
    async def call(stub: workload_grpc.SpiffeWorkloadAPIStub) -> GRPCError:
        with pytest.raises(GRPCError) as caught:
            await getattr(stub, method)(request_message, metadata=HEADER)
        return caught.value

    error = running.grpclib(call)

    assert error.status == Status.INVALID_ARGUMENT
    assert error.message is not None and error.message.startswith(message)


def test_the_peer_credentials_come_from_the_socket(running: RunningServer) -> None:
    with running.client() as client:
        client.fetch_x509_svid()

    assert running.provider.peers == [
        PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
    ]


# -- callers without an identity ----------------------------------------------------------


@pytest.fixture
def nobody(running: RunningServer) -> RunningServer:
    running.replace(X509Context(svids=(), federated_bundles={}))
    return running


def test_a_caller_without_identity_gets_permission_denied(nobody: RunningServer) -> None:
    with nobody.client() as client, pytest.raises(FetchX509SvidError) as caught:
        client.fetch_x509_svid()

    assert _rpc_status(caught.value) == (grpc.StatusCode.PERMISSION_DENIED, "no identity issued")


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("FetchJWTSVID", pb.JWTSVIDRequest(audience=["db"])),
        ("ValidateJWTSVID", pb.ValidateJWTSVIDRequest(audience="db", svid="x")),
    ],
)
def test_no_identity_for_unary_calls(
    nobody: RunningServer, method: str, request_message: Any
) -> None:
    async def call(stub: workload_grpc.SpiffeWorkloadAPIStub) -> GRPCError:
        with pytest.raises(GRPCError) as caught:
            await getattr(stub, method)(request_message, metadata=HEADER)
        return caught.value

    error = nobody.grpclib(call)

    assert (error.status, error.message) == (Status.PERMISSION_DENIED, "no identity issued")


@pytest.mark.parametrize("method", ["FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles"])
def test_no_identity_for_streams(nobody: RunningServer, method: str) -> None:
    request = {
        "FetchX509SVID": pb.X509SVIDRequest(),
        "FetchX509Bundles": pb.X509BundlesRequest(),
        "FetchJWTBundles": pb.JWTBundlesRequest(),
    }[method]

    async def call(stub: workload_grpc.SpiffeWorkloadAPIStub) -> GRPCError:
        with pytest.raises(GRPCError) as caught:
            await getattr(stub, method)(request, metadata=HEADER)
        return caught.value

    error = nobody.grpclib(call)

    assert (error.status, error.message) == (Status.PERMISSION_DENIED, "no identity issued")


# -- streams ------------------------------------------------------------------------------


def test_a_stream_sends_only_changes_and_ends_when_the_identity_is_gone(
    running: RunningServer,
) -> None:
    provider = running.provider
    original = provider.context
    rotated = X509Context(svids=(x509_svid_material(running.ca, WORKLOAD_ID),),
                          federated_bundles={})  # fmt: skip

    async def watch(stub: workload_grpc.SpiffeWorkloadAPIStub) -> tuple[list[Any], GRPCError]:
        received: list[Any] = []
        with pytest.raises(GRPCError) as caught:
            async with stub.FetchX509SVID.open(metadata=HEADER) as stream:
                await stream.send_message(pb.X509SVIDRequest(), end=True)
                received.append(await stream.recv_message())
                reads = provider.context_reads
                await provider.replace(original)  # a new version, the same content
                while provider.context_reads == reads:  # until the server has looked
                    await asyncio.sleep(0)
                await provider.replace(rotated)
                received.append(await stream.recv_message())
                await provider.replace(X509Context(svids=(), federated_bundles={}))
                received.append(await stream.recv_message())
        return received, caught.value

    received, error = running.grpclib(watch)

    first, second, end = received
    assert [_serial(s.x509_svid) for s in first.svids] == [
        _serial(s.cert_chain_der) for s in original.svids
    ]
    assert [_serial(s.x509_svid) for s in second.svids] == [
        _serial(rotated.svids[0].cert_chain_der)
    ]
    assert end is None
    assert (error.status, error.message) == (Status.PERMISSION_DENIED, "no identity issued")


def test_bundle_streams_push_a_message_when_a_bundle_changes(running: RunningServer) -> None:
    """A CA rotation or a revocation changes the bundles and nothing else: both bundle
    streams (and FetchX509SVID, whose SVIDs carry the bundle) send the new state."""
    provider = running.provider
    rotated_ca, rotated_jwt_key = TestCA("example.org"), ec.generate_private_key(ec.SECP256R1())

    async def watch(stub: workload_grpc.SpiffeWorkloadAPIStub) -> tuple[Any, Any, Any, Any]:
        async with stub.FetchX509Bundles.open(metadata=HEADER) as x509_stream, \
                stub.FetchJWTBundles.open(metadata=HEADER) as jwt_stream:  # fmt: skip
            await x509_stream.send_message(pb.X509BundlesRequest(), end=True)
            await jwt_stream.send_message(pb.JWTBundlesRequest(), end=True)
            x509_first = await x509_stream.recv_message()
            jwt_first = await jwt_stream.recv_message()
            provider.own_ca, provider.jwt_key = rotated_ca, rotated_jwt_key
            await provider.replace(provider.context)  # the agent's cache version moves
            x509_second = await x509_stream.recv_message()
            jwt_second = await jwt_stream.recv_message()
            await x509_stream.cancel()  # the server never ends these streams
            await jwt_stream.cancel()
            return x509_first, x509_second, jwt_first, jwt_second

    x509_first, x509_second, jwt_first, jwt_second = running.grpclib(watch)

    assert x509_first.bundles[TRUST_DOMAIN] == running.ca.bundle_der()
    assert x509_second.bundles[TRUST_DOMAIN] == rotated_ca.bundle_der()
    assert x509_second.bundles[FEDERATED] == x509_first.bundles[FEDERATED]

    def jwt_key(message: Any) -> Any:
        [key] = json.loads(message.bundles[TRUST_DOMAIN])["keys"]
        return jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(key)).public_numbers()

    assert jwt_key(jwt_first) != jwt_key(jwt_second)
    assert jwt_key(jwt_second) == rotated_jwt_key.public_key().public_numbers()


def test_closing_the_server_ends_open_streams_with_unavailable(running: RunningServer) -> None:
    async def watch_then_close(stub: workload_grpc.SpiffeWorkloadAPIStub) -> GRPCError:
        with pytest.raises(GRPCError) as caught:
            async with stub.FetchJWTBundles.open(metadata=HEADER) as stream:
                await stream.send_message(pb.JWTBundlesRequest(), end=True)
                assert await stream.recv_message() is not None
                await running.server.close()
                await stream.recv_message()
        return caught.value

    error = running.grpclib(watch_then_close)

    assert (error.status, error.message) == (Status.UNAVAILABLE, SHUTTING_DOWN)
    assert not running.socket_path.exists()


# -- the socket file ----------------------------------------------------------------------


def test_the_socket_is_world_connectable(running: RunningServer) -> None:
    assert stat.S_IMODE(running.socket_path.stat().st_mode) == 0o777


def test_a_stale_socket_is_replaced(
    loop_thread: LoopThread, provider: FakeIdentityProvider, tmp_path: Path
) -> None:
    socket_path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(socket_path))  # bound, never listening: what a crashed agent leaves
    server = _start(loop_thread, provider, socket_path)
    try:
        with WorkloadApiClient(socket_path=f"unix://{socket_path}") as client:
            assert client.fetch_x509_svid().spiffe_id == SpiffeId(WORKLOAD_ID)
    finally:
        loop_thread.run(server.close())


def test_a_live_socket_is_not_taken_over(running: RunningServer) -> None:
    second = WorkloadApiServer(running.provider)

    with pytest.raises(ConfigError) as caught:
        running.loop.run(second.start(running.socket_path))

    assert str(caught.value) == (
        f"another process is already serving on {running.socket_path}; "
        "stop it or choose another socket path"
    )


def test_a_file_in_the_way_is_not_removed(
    loop_thread: LoopThread, provider: FakeIdentityProvider, tmp_path: Path
) -> None:
    socket_path = tmp_path / "agent.sock"
    socket_path.write_text("not a socket")
    server = WorkloadApiServer(provider)

    with pytest.raises(ConfigError) as caught:
        loop_thread.run(server.start(socket_path))

    assert str(caught.value) == (
        f"{socket_path} exists and is not a socket; remove it or choose another socket path"
    )
    assert socket_path.read_text() == "not a socket"


def test_a_socket_path_too_long_for_unix_sockets(
    loop_thread: LoopThread, provider: FakeIdentityProvider, tmp_path: Path
) -> None:
    socket_path = tmp_path / ("d" * 100) / "agent.sock"
    server = WorkloadApiServer(provider)

    with pytest.raises(ConfigError) as caught:
        loop_thread.run(server.start(socket_path))

    assert str(caught.value) == (
        f"the Workload API socket path {socket_path} is longer than 107 bytes, "
        "the limit for Unix sockets; choose a shorter path"
    )


def test_unauthenticated_verifiers_may_fetch_bundles_and_validate(
    loop_thread: LoopThread, provider: FakeIdentityProvider, tmp_path: Path
) -> None:
    token = provider.mint_jwt(WORKLOAD_ID, ["db"])
    loop_thread.run(provider.replace(X509Context(svids=(), federated_bundles={})))
    socket_path = tmp_path / "agent.sock"
    server = WorkloadApiServer(provider, allow_unauthenticated_verifiers=True)
    loop_thread.run(server.start(socket_path))
    try:
        with WorkloadApiClient(socket_path=f"unix://{socket_path}") as client:
            assert client.fetch_jwt_bundles().get_bundle_for_trust_domain(
                TrustDomain("example.org")
            )
            assert len(client.fetch_x509_bundles().bundles) == 2
            assert client.validate_jwt_svid(token, "db").spiffe_id == SpiffeId(WORKLOAD_ID)
            with pytest.raises(FetchX509SvidError) as caught:
                client.fetch_x509_svid()
    finally:
        loop_thread.run(server.close())

    assert _rpc_status(caught.value) == (grpc.StatusCode.PERMISSION_DENIED, "no identity issued")


def test_the_context_manager_closes_and_a_closed_server_starts_again(
    loop_thread: LoopThread, provider: FakeIdentityProvider, tmp_path: Path
) -> None:
    socket_path = tmp_path / "agent.sock"
    server = WorkloadApiServer(provider)

    async def serve_and_close() -> bool:
        async with server:
            await server.start(socket_path)
            listening = socket_path.exists()
        return listening

    assert loop_thread.run(serve_and_close())
    assert not socket_path.exists()

    loop_thread.run(server.start(socket_path))
    try:
        with WorkloadApiClient(socket_path=f"unix://{socket_path}") as client:
            assert client.fetch_x509_svid().spiffe_id == SpiffeId(WORKLOAD_ID)
    finally:
        loop_thread.run(server.close())


# -- the call path: shared response messages, waiting for changes ------------------------


def test_callers_with_the_same_identities_share_one_message(
    provider: FakeIdentityProvider, test_ca: TestCA
) -> None:
    async def main() -> None:
        service = _WorkloadApiService(provider, allow_unauthenticated_verifiers=False)
        same = X509Context(
            svids=provider.context.svids, federated_bundles=dict(provider.context.federated_bundles)
        )
        other = X509Context(svids=(x509_svid_material(test_ca, WORKLOAD_ID),), federated_bundles={})

        first = service._x509_svid_message(provider.context)
        again = service._x509_svid_message(same)
        different = service._x509_svid_message(other)
        await provider.replace(provider.context)  # a new version, the same content
        after_change = service._x509_svid_message(provider.context)

        assert again is first
        assert [s.spiffe_id for s in first.svids] == [WORKLOAD_ID, SECOND_ID]
        assert [s.hint for s in first.svids] == ["", "second"]
        assert dict(first.federated_bundles) == dict(provider.context.federated_bundles)
        assert different is not first
        assert [s.x509_svid for s in different.svids] == [other.svids[0].cert_chain_der]
        assert after_change is not first
        assert after_change == first

    asyncio.run(main())


async def _waiting(
    service: _WorkloadApiService, provider: FakeIdentityProvider
) -> asyncio.Task[None]:
    """A task in ``_next_change``, once it waits."""
    task = asyncio.create_task(service._next_change(provider.version()))
    while task not in service._waiting:
        await asyncio.sleep(0)
    return task


def test_a_change_ends_the_wait(provider: FakeIdentityProvider) -> None:
    async def main() -> None:
        service = _WorkloadApiService(provider, allow_unauthenticated_verifiers=False)
        task = await _waiting(service, provider)

        await provider.replace(provider.context)
        await task

        assert service._waiting == set()

    asyncio.run(main())


def test_shutting_down_turns_the_wait_into_unavailable(provider: FakeIdentityProvider) -> None:
    async def main() -> None:
        service = _WorkloadApiService(provider, allow_unauthenticated_verifiers=False)
        task = await _waiting(service, provider)

        await service.shut_down(DEADLINE_SECONDS)

        with pytest.raises(Unavailable) as caught:
            await task
        assert caught.value.message == SHUTTING_DOWN
        assert (service._waiting, service._woken_for_shutdown) == (set(), set())
        with pytest.raises(Unavailable):  # no new wait once closing
            await service._next_change(provider.version())

    asyncio.run(main())


def test_a_stream_cancelled_by_its_client_stays_cancelled(
    provider: FakeIdentityProvider,
) -> None:
    async def main() -> None:
        service = _WorkloadApiService(provider, allow_unauthenticated_verifiers=False)
        alone = await _waiting(service, provider)
        during_shutdown = await _waiting(service, provider)

        alone.cancel()
        during_shutdown.cancel()
        await service.shut_down(DEADLINE_SECONDS)

        for task in (alone, during_shutdown):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert (service._waiting, service._woken_for_shutdown) == (set(), set())

    asyncio.run(main())


# -- limits: message size, malformed frames, idle connections, connections per uid --------


class RawGrpcConnection:
    """An HTTP/2 connection to the socket driven by hand: the server gets exactly the bytes
    a test sends, framed or not as a well-behaved client would (for what no client sends)."""

    def __init__(self, socket_path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE_SECONDS)
        self.sock.connect(str(socket_path))
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.closed = False
        self._flush()

    def start_call(self, method: str, data: bytes = b"", *, end: bool = True) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [
            (":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
            (":path", f"/SpiffeWorkloadAPI/{method}"), ("content-type", "application/grpc"),
            ("te", "trailers"), (SECURITY_HEADER, "true"),
        ])  # fmt: skip
        self._flush()
        self._send_data(stream_id, data, end=end)
        return stream_id

    def _send_data(self, stream_id: int, data: bytes, *, end: bool) -> None:
        """DATA frames as the server's flow-control window lets them go."""
        view = memoryview(data)
        while view:
            room = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if room <= 0:
                assert not self.closed, "the server closed the connection while we sent"
                self._receive()  # until the server opens its window
                continue
            self.h2.send_data(stream_id, bytes(view[:room]))
            view = view[room:]
            self._flush()
        if end:
            self.h2.end_stream(stream_id)
            self._flush()

    def status(self, stream_id: int) -> tuple[Status, str]:
        """The gRPC status the server ends ``stream_id`` with."""
        while True:
            for event in self.events:
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    if event.stream_id != stream_id:
                        continue
                    headers = dict(event.headers)
                    if "grpc-status" in headers:
                        message = decode_grpc_message(headers.get("grpc-message", ""))
                        return Status(int(headers["grpc-status"])), message
            assert not self.closed, f"the connection closed without a status: {self.events}"
            self._receive()

    def data(self, stream_id: int) -> bytes:
        """The next DATA the server sends on ``stream_id``."""
        while True:
            for index, event in enumerate(self.events):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    del self.events[index]
                    return bytes(event.data)
            assert not self.closed, f"the connection closed without data: {self.events}"
            self._receive()

    def wait_closed_by_server(self) -> None:
        """Read until the server closes the connection (the socket's timeout is the deadline)."""
        while not self.closed:
            self._receive()

    def goaway(self) -> h2.events.ConnectionTerminated:
        [goaway] = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return goaway

    def close(self) -> None:
        self.sock.close()

    def _receive(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        self.events.extend(self.h2.receive_data(data))
        self._flush()

    def _flush(self) -> None:
        outgoing = self.h2.data_to_send()
        if outgoing:
            # A refused connection may be closed before the client has said anything:
            # what the server said before closing is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.sock.sendall(outgoing)


def _framed(payload: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message; ``length`` lies about its size when given."""
    size = len(payload) if length is None else length
    return bytes([int(compressed)]) + size.to_bytes(4, "big") + payload


def _start_limited(
    loop: LoopThread, provider: FakeIdentityProvider, socket_path: Path, limits: ServerLimits
) -> WorkloadApiServer:
    server = WorkloadApiServer(provider, shutdown_grace=DEADLINE_SECONDS, limits=limits)
    loop.run(server.start(socket_path))
    return server


@pytest.fixture
def raw(running: RunningServer) -> Iterator[RawGrpcConnection]:
    connection = RawGrpcConnection(running.socket_path)
    yield connection
    connection.close()


def _grpc_records(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[Any]:
    return [
        r for r in caplog.records
        if r.levelno >= level and r.name.startswith(("workload_api", "grpclib"))
    ]


def test_an_oversized_message_is_refused_from_its_length_prefix(
    raw: RawGrpcConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the 5-byte prefix and 1 KiB follow the headers: the answer arrives anyway, so the
    agent decided from the prefix, without waiting for (or buffering) the 300 MB it announced."""
    caplog.set_level(logging.INFO)
    stream_id = raw.start_call(
        "FetchJWTSVID", _framed(b"\0" * 1024, length=300 * 1024 * 1024), end=False
    )

    assert raw.status(stream_id) == (
        Status.RESOURCE_EXHAUSTED,
        "the request message is 314572800 bytes, more than the 4194304 bytes (4 MiB) "
        "the Tessera agent accepts",
    )
    [record] = _grpc_records(caplog)
    assert record.exc_info is None
    assert record.getMessage() == (
        f"Workload API FetchJWTSVID refused pid {os.getpid()} (uid {os.getuid()}, "
        f"gid {os.getgid()}): RESOURCE_EXHAUSTED: the request message is 314572800 bytes, "
        "more than the 4194304 bytes (4 MiB) the Tessera agent accepts"
    )


def test_a_message_of_4_mib_is_still_read(raw: RawGrpcConnection) -> None:
    audience = "a" * (4 * 1024 * 1024 - 16)
    payload = pb.ValidateJWTSVIDRequest(audience=audience, svid="x").SerializeToString()
    assert len(payload) <= 4 * 1024 * 1024
    stream_id = raw.start_call("ValidateJWTSVID", _framed(payload))

    # Read whole and decoded: refused for what it says, not for its size.
    assert raw.status(stream_id) == (
        Status.INVALID_ARGUMENT,
        "the audience is 4194288 bytes long; an audience may be at most 2048 bytes",
    )


@pytest.mark.parametrize(
    ("method", "data", "message"),
    [
        (
            "FetchJWTSVID",
            _framed(b"\xff\xff\xff\xff"),
            "the request is not a valid JWTSVIDRequest message",
        ),
        (
            "FetchX509SVID",
            b"\0\0\0",
            "the request ended inside a message's 5-byte length prefix",
        ),
        (
            "FetchJWTSVID",
            _framed(b"\x0a\x02db", length=100),
            "the request ended before the 100 bytes its message's length prefix announced",
        ),
        (
            "FetchJWTSVID",
            _framed(pb.JWTSVIDRequest(audience=["db"]).SerializeToString(), compressed=True),
            "the request message is marked compressed, but no compression was negotiated; "
            "send it uncompressed",
        ),
    ],
    ids=["bad-protobuf", "short-prefix", "short-body", "compressed-flag"],
)
def test_malformed_frames_are_invalid_and_logged_in_one_line(
    raw: RawGrpcConnection,
    caplog: pytest.LogCaptureFixture,
    method: str,
    data: bytes,
    message: str,
) -> None:
    caplog.set_level(logging.INFO)
    before = _calls(method, "INVALID_ARGUMENT")

    stream_id = raw.start_call(method, data)

    assert raw.status(stream_id) == (Status.INVALID_ARGUMENT, message)
    [record] = _grpc_records(caplog)
    assert record.exc_info is None
    assert record.getMessage().endswith(f"INVALID_ARGUMENT: {message}")
    assert _calls(method, "INVALID_ARGUMENT") == before + 1


@pytest.mark.parametrize(
    ("method", "request_message", "message"),
    [
        (
            "FetchJWTSVID",
            pb.JWTSVIDRequest(audience=[f"aud{i}" for i in range(33)]),
            "33 audiences were asked for; ask for at most 32 at a time",
        ),
        (
            "FetchJWTSVID",
            pb.JWTSVIDRequest(audience=["db", "a" * 2049]),
            "audience 2 is 2049 bytes long; an audience may be at most 2048 bytes",
        ),
        (
            "FetchJWTSVID",
            pb.JWTSVIDRequest(audience=[f"{i}" + "a" * 1999 for i in range(5)]),
            "the audiences take 10016 bytes in a JWT-SVID; together they may take at most 8192",
        ),
        (
            "ValidateJWTSVID",
            pb.ValidateJWTSVIDRequest(audience="a" * 2049, svid="x"),
            "the audience is 2049 bytes long; an audience may be at most 2048 bytes",
        ),
    ],
)
def test_audiences_are_bounded_before_anything_is_asked_of_the_server(
    running: RunningServer, method: str, request_message: Any, message: str
) -> None:
    async def call(stub: workload_grpc.SpiffeWorkloadAPIStub) -> GRPCError:
        with pytest.raises(GRPCError) as caught:
            await getattr(stub, method)(request_message, metadata=HEADER)
        return caught.value

    error = running.grpclib(call)

    assert (error.status, error.message) == (Status.INVALID_ARGUMENT, message)
    assert running.provider.jwt_requests == []


def test_32_audiences_and_one_of_2048_bytes_are_allowed(running: RunningServer) -> None:
    audiences = {f"aud{i}" for i in range(31)} | {"a" * 2048}
    with running.client() as client:
        svid = client.fetch_jwt_svid(audience=audiences)

    assert svid.audience == audiences


def test_idle_connections_are_closed_and_watches_are_not_idle(
    loop_thread: LoopThread, provider: FakeIdentityProvider, test_ca: TestCA, tmp_path: Path
) -> None:
    socket_path = tmp_path / "agent.sock"
    limits = ServerLimits(idle_timeout=0.2)
    server = _start_limited(loop_thread, provider, socket_path, limits)
    watching = RawGrpcConnection(socket_path)
    idle = RawGrpcConnection(socket_path)
    try:
        watch = watching.start_call("FetchX509SVID", _framed(b""))
        assert watching.data(watch)  # the first message: the watch is open

        idle.wait_closed_by_server()  # polls, with the socket's timeout as the deadline

        assert idle.goaway().error_code == h2.errors.ErrorCodes.NO_ERROR
        rotated = X509Context(svids=(x509_svid_material(test_ca, WORKLOAD_ID),),
                              federated_bundles={})  # fmt: skip
        loop_thread.run(provider.replace(rotated))
        update = pb.X509SVIDResponse.FromString(watching.data(watch)[5:])
        assert _serial(update.svids[0].x509_svid) == _serial(rotated.svids[0].cert_chain_der)
        assert not watching.closed
    finally:
        watching.close()
        idle.close()
        loop_thread.run(server.close())


def test_a_connection_idle_after_its_calls_is_closed(
    loop_thread: LoopThread, provider: FakeIdentityProvider, tmp_path: Path
) -> None:
    socket_path = tmp_path / "agent.sock"
    server = _start_limited(loop_thread, provider, socket_path, ServerLimits(idle_timeout=0.2))
    connection = RawGrpcConnection(socket_path)
    try:
        call = connection.start_call("FetchJWTSVID", _framed(b"\x0a\x02db"))
        assert connection.status(call) == (Status.OK, "")

        connection.wait_closed_by_server()
    finally:
        connection.close()
        loop_thread.run(server.close())


def test_connections_per_uid_are_capped(
    loop_thread: LoopThread,
    provider: FakeIdentityProvider,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    socket_path = tmp_path / "agent.sock"
    limits = ServerLimits(max_connections_per_uid=2)
    server = _start_limited(loop_thread, provider, socket_path, limits)
    first, second = RawGrpcConnection(socket_path), RawGrpcConnection(socket_path)
    refused = [RawGrpcConnection(socket_path), RawGrpcConnection(socket_path)]
    try:
        for connection in refused:
            connection.wait_closed_by_server()
            goaway = connection.goaway()
            assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert goaway.additional_data == (
                b"uid %d has 2 connections open to the Tessera agent, the most it may have"
                % os.getuid()
            )
        # The first two still work.
        for connection in (first, second):
            call = connection.start_call("FetchJWTSVID", _framed(b"\x0a\x02db"))
            assert connection.status(call) == (Status.OK, "")
        refusals = [r for r in _grpc_records(caplog) if "a connection" in r.getMessage()]
        assert [r.getMessage() for r in refusals] == [
            f"Workload API refused a connection from pid {os.getpid()} (uid {os.getuid()}, "
            f"gid {os.getgid()}): uid {os.getuid()} has 2 connections open to the Tessera "
            "agent, the most it may have (workload_api_max_connections_per_uid)"
        ]  # once, not once per refused connection

        first.close()  # a place frees up
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            assert time.monotonic() < deadline, "no connection was accepted after one closed"
            third = RawGrpcConnection(socket_path)
            call = third.start_call("FetchJWTSVID", _framed(b"\x0a\x02db"))
            try:
                if third.status(call) == (Status.OK, ""):
                    break
            except AssertionError:
                pass  # refused: the agent had not yet seen the first one close
            finally:
                third.close()
    finally:
        for connection in (first, second, *refused):
            connection.close()
        loop_thread.run(server.close())


def test_a_refusal_is_logged_once_per_caller_and_method(
    nobody: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    with nobody.client() as client:
        for _ in range(3):
            with pytest.raises(FetchX509SvidError):
                client.fetch_x509_svid()
        with pytest.raises(FetchJwtSvidError):
            client.fetch_jwt_svid(audience={"db"})

    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [(r.levelname, r.getMessage().split(" refused ")[0]) for r in refusals] == [
        ("INFO", "Workload API FetchX509SVID"),
        ("DEBUG", "Workload API FetchX509SVID"),
        ("DEBUG", "Workload API FetchX509SVID"),
        ("INFO", "Workload API FetchJWTSVID"),
    ]


def test_a_refusal_is_logged_again_once_the_caller_was_served(
    running: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    served = running.provider.context
    nobody = X509Context(svids=(), federated_bundles={})

    with running.client() as client:
        for context in (nobody, nobody, served, nobody):
            running.replace(context)
            with contextlib.suppress(FetchX509SvidError):
                client.fetch_x509_svid()

    refusals = [r for r in _grpc_records(caplog) if "refused" in r.getMessage()]
    assert len(refusals) == 2


def test_clients_going_away_are_not_logged_at_info(
    running: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(3):
        connection = RawGrpcConnection(running.socket_path)
        watch = connection.start_call("FetchX509SVID", _framed(b""))
        assert connection.data(watch)
        connection.h2.reset_stream(watch)
        connection._flush()
        connection.close()
    # One call more, so the resets above have been handled when it answers.
    with running.client() as client:
        client.fetch_x509_svid()

    assert _grpc_records(caplog) == []


def test_partial_messages_hold_one_window_per_connection(raw: RawGrpcConnection) -> None:
    """A peer sends all but the last byte of a 4 MiB message, then opens more streams: the
    agent does not acknowledge the partial message, so the connection's flow-control window
    leaves no room for a second one, however many streams the peer opens."""
    first = raw.start_call(
        "FetchJWTSVID", _framed(b"\0" * (MAX_MESSAGE_BYTES - 1), length=MAX_MESSAGE_BYTES),
        end=False,
    )
    second = raw.start_call("FetchJWTSVID", end=False)
    raw.h2.ping(b"tessera!")
    raw._flush()
    while not any(isinstance(e, h2.events.PingAckReceived) for e in raw.events):
        raw._receive()  # the agent has handled everything sent before the ping

    assert raw.h2.local_flow_control_window(second) < MAX_MESSAGE_BYTES // 32
    raw._send_data(first, b"\0", end=True)  # the message completes: its bytes are acknowledged
    assert raw.status(first)[0] == Status.INVALID_ARGUMENT  # read whole, then decoded
    raw.h2.ping(b"tessera?")
    raw._flush()
    while sum(isinstance(e, h2.events.PingAckReceived) for e in raw.events) < 2:
        raw._receive()
    assert raw.h2.local_flow_control_window(second) > MAX_MESSAGE_BYTES


def test_a_call_whose_request_never_comes_is_ended(
    raw: RawGrpcConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers and no message: the stream is not held for ever (it is not idle, it is a
    call in progress, so the idle limit alone would never end it)."""
    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT_SECONDS", 0.2)
    stream_id = raw.start_call("FetchJWTSVID", b"", end=False)

    assert raw.status(stream_id) == (
        Status.DEADLINE_EXCEEDED, "no request message within 0.2s of the call's headers"
    )
