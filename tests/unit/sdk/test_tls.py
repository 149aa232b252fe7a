"""mTLS with the SDK's contexts: real sockets, real handshakes, rotation without restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from spiffe import SpiffeId, X509Bundle, X509Svid

from sdk.authorize import Authorizer, authorize_any, authorize_id, authorize_member_of
from sdk.errors import AuthenticationError, AuthorizationError, SourceError
from sdk.sources import StaticX509Source
from sdk.tls import (
    TlsMaterial,
    mtls_client_context,
    mtls_server_context,
    peer_spiffe_id,
    server_context,
    tls_client_context,
)
from tests.unit.sdk.conftest import (
    API_ID,
    DEADLINE_SECONDS,
    PARTNER_DOMAIN,
    TRUST_DOMAIN,
    WEB_ID,
    LoopThread,
    TestCA,
    serial_of,
    wait_until,
)

# -- servers and clients ------------------------------------------------------------------


class EchoServer:
    """An asyncio TLS server (SSLObject) answering each line with the caller's SPIFFE ID."""

    def __init__(self, loop: LoopThread, context: ssl.SSLContext) -> None:
        self.loop = loop
        self.handled: list[tuple[SpiffeId, int]] = []
        self.server = loop.run(asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context))
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        peer = peer_spiffe_id(tls)
        self.handled.append((peer, _serial(tls.getpeercert(binary_form=True))))
        try:
            while line := await reader.readline():
                writer.write(f"{peer} says {line.decode().strip()}\n".encode())
                await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        self.loop.run(close())


class ThreadedServer:
    """A blocking TLS server (SSLSocket) in a thread; keeps the errors its accept raised."""

    def __init__(self, context: ssl.SSLContext) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = listener.getsockname()[1]
        self._tls = context.wrap_socket(listener, server_side=True)
        self.errors: list[Exception] = []
        self.handled: list[SpiffeId] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._tls.accept()
            except ssl.SSLError as err:
                self.errors.append(err)
                continue
            except OSError:
                return  # the listener was shut down
            with connection:
                self.handled.append(peer_spiffe_id(connection))
                with contextlib.suppress(OSError):  # the client may refuse this server
                    connection.sendall(b"ok " + connection.recv(1024))

    def close(self) -> None:
        self._tls.shutdown(socket.SHUT_RDWR)
        self._thread.join(DEADLINE_SECONDS)
        self._tls.close()


class Client:
    """A blocking TLS client (SSLSocket)."""

    def __init__(
        self, context: ssl.SSLContext, port: int, *, session: ssl.SSLSession | None = None
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS)
        self.tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
        self._reader = self.tls.makefile("rb")

    def say(self, text: str) -> str:
        self.tls.sendall(text.encode() + b"\n")
        return self._reader.readline().decode().strip()

    def server_serial(self) -> int:
        return _serial(self.tls.getpeercert(binary_form=True))

    def is_cut_off(self) -> bool:
        """Whether the server closed the connection instead of answering."""
        try:
            self.tls.sendall(b"hello\n")
            return self._reader.readline() == b""
        except (ssl.SSLError, ConnectionError):
            return True

    def close(self) -> None:
        """Close with a close_notify, so that the server keeps the session for resumption."""
        self._reader.close()
        with contextlib.suppress(OSError):
            self.tls.unwrap()
        self.tls.close()


def _serial(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
def serve(loop_thread: LoopThread) -> Iterator[Any]:
    servers: list[EchoServer] = []

    def start(source: StaticX509Source, authorizer: Authorizer) -> EchoServer:
        server = EchoServer(loop_thread, mtls_server_context(source, authorizer))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def threaded() -> Iterator[Any]:
    servers: list[ThreadedServer] = []

    def start(context: ssl.SSLContext) -> ThreadedServer:
        server = ThreadedServer(context)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sdk.tls"]


# -- a full exchange ----------------------------------------------------------------------


def test_mutual_tls_names_both_peers(
    serve: Any, api_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    server = serve(api_source, authorize_id(WEB_ID))
    client = Client(mtls_client_context(web_source, authorize_id(API_ID)), server.port)

    assert client.say("hello") == f"{WEB_ID} says hello"
    assert peer_spiffe_id(client.tls) == SpiffeId(API_ID)
    assert client.server_serial() == api_source.x509_svid().leaf.serial_number
    assert [peer for peer, _ in server.handled] == [SpiffeId(WEB_ID)]
    client.close()


def test_an_asyncio_client(
    loop_thread: LoopThread,
    serve: Any,
    api_source: StaticX509Source,
    web_source: StaticX509Source,
) -> None:
    server = serve(api_source, authorize_member_of(TRUST_DOMAIN))
    context = mtls_client_context(web_source, authorize_id(API_ID))

    async def talk() -> tuple[str, SpiffeId]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=context, server_hostname="localhost"
        )
        writer.write(b"hi\n")
        answer = await reader.readline()
        peer = peer_spiffe_id(writer.get_extra_info("ssl_object"))
        writer.close()
        await writer.wait_closed()
        return answer.decode().strip(), peer

    assert loop_thread.run(talk()) == (f"{WEB_ID} says hi", SpiffeId(API_ID))


def test_a_chain_through_an_intermediate(
    serve: Any, ca: TestCA, api_source: StaticX509Source
) -> None:
    intermediate = ca.intermediate()
    source = StaticX509Source(intermediate.issue_x509_svid(WEB_ID), [ca.bundle()])
    server = serve(api_source, authorize_id(WEB_ID))

    client = Client(mtls_client_context(source, authorize_id(API_ID)), server.port)

    assert client.say("hello") == f"{WEB_ID} says hello"
    client.close()


# -- refusals -----------------------------------------------------------------------------


def test_a_refused_client_is_cut_off_before_the_app_sees_a_byte(
    serve: Any, ca: TestCA, api_source: StaticX509Source, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sdk.tls")
    server = serve(api_source, authorize_id(WEB_ID))
    intruder = StaticX509Source(ca.issue_x509_svid("spiffe://example.org/intruder"), [ca.bundle()])

    client = Client(mtls_client_context(intruder, authorize_id(API_ID)), server.port)

    assert client.is_cut_off()
    wait_until(lambda: refusals(caplog), "the server to log the refusal")
    assert refusals(caplog) == [
        "TLS server: refused the peer: spiffe://example.org/intruder refused by "
        "authorize_id: expected spiffe://example.org/web"
    ]
    assert server.handled == []  # the application never ran
    client.close()


def test_a_blocking_server_fails_the_handshake_with_the_authorization_error(
    threaded: Any, ca: TestCA, api_source: StaticX509Source
) -> None:
    server = threaded(mtls_server_context(api_source, authorize_id(WEB_ID)))
    intruder = StaticX509Source(ca.issue_x509_svid("spiffe://example.org/intruder"), [ca.bundle()])

    client = Client(mtls_client_context(intruder, authorize_id(API_ID)), server.port)

    assert client.is_cut_off()
    wait_until(lambda: server.errors, "the server to refuse")
    (error,) = server.errors
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert str(error) == (
        "spiffe://example.org/intruder refused by authorize_id: expected spiffe://example.org/web"
    )
    cause = error.__cause__
    assert isinstance(cause, AuthorizationError)
    assert (cause.peer_id, cause.rule) == (
        SpiffeId("spiffe://example.org/intruder"),
        "authorize_id",
    )
    assert server.handled == []
    client.close()


def test_the_client_refuses_a_server_with_another_id(
    serve: Any, api_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    server = serve(api_source, authorize_any())
    context = mtls_client_context(web_source, authorize_id("spiffe://example.org/db"))

    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        Client(context, server.port)

    assert str(refused.value) == (
        "spiffe://example.org/api refused by authorize_id: expected spiffe://example.org/db"
    )
    assert isinstance(refused.value.__cause__, AuthorizationError)
    assert refused.value.__cause__.peer_id == SpiffeId(API_ID)


def test_an_asyncio_client_refuses_a_server_with_another_id(
    loop_thread: LoopThread,
    serve: Any,
    api_source: StaticX509Source,
    web_source: StaticX509Source,
) -> None:
    server = serve(api_source, authorize_any())
    context = mtls_client_context(web_source, authorize_member_of(PARTNER_DOMAIN))

    async def connect() -> None:
        await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=context, server_hostname="localhost"
        )

    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        loop_thread.run(connect())

    assert str(refused.value) == (
        "spiffe://example.org/api refused by authorize_member_of: "
        "expected a member of trust domain partner.test"
    )


def test_a_federated_ca_cannot_vouch_for_another_trust_domain(
    threaded: Any, ca: TestCA, partner_ca: TestCA, api_source: StaticX509Source
) -> None:
    server = threaded(mtls_server_context(api_source, authorize_any()))
    forged = StaticX509Source(partner_ca.issue_x509_svid(WEB_ID), [ca.bundle()])
    partner = StaticX509Source(
        partner_ca.issue_x509_svid("spiffe://partner.test/web"), [ca.bundle()]
    )

    forger = Client(mtls_client_context(forged, authorize_any()), server.port)
    assert forger.is_cut_off()
    wait_until(lambda: server.errors, "the server to refuse")
    legit = Client(mtls_client_context(partner, authorize_any()), server.port)
    assert legit.say("hi") == "ok hi"

    assert [str(e) for e in server.errors] == [
        "the certificate of spiffe://example.org/web does not chain to the bundle of trust "
        "domain example.org; a trust domain may only vouch for its own IDs"
    ]
    assert isinstance(server.errors[0].__cause__, AuthenticationError)
    assert server.handled == [SpiffeId("spiffe://partner.test/web")]
    forger.close()
    legit.close()


def test_data_before_the_handshake_runs_the_authorizer_first(
    threaded: Any, api_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    server = threaded(mtls_server_context(api_source, authorize_any()))
    context = mtls_client_context(web_source, authorize_id("spiffe://example.org/db"))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_SECONDS)
    tls = context.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)

    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        tls.sendall(b"secret\n")

    assert str(refused.value).startswith("spiffe://example.org/api refused by authorize_id")
    tls.close()


def test_a_client_without_an_svid_of_its_own(
    loop_thread: LoopThread, ca: TestCA, api_source: StaticX509Source
) -> None:
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # a server that asks for no client cert
    _load(plain, api_source.x509_svid())
    server = loop_thread.run(asyncio.start_server(_answer, "127.0.0.1", 0, ssl=plain))
    port = server.sockets[0].getsockname()[1]
    # used only for its bundles
    bundles = StaticX509Source(ca.issue_x509_svid(WEB_ID), [ca.bundle()])
    try:
        client = Client(tls_client_context(bundles, authorize_id(API_ID)), port)
        assert client.say("hi") == "no client certificate"
        assert peer_spiffe_id(client.tls) == SpiffeId(API_ID)
        client.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            Client(tls_client_context(bundles, authorize_id(WEB_ID)), port)
    finally:
        loop_thread.close_server(server)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    tls = writer.get_extra_info("ssl_object")
    writer.write(b"no client certificate\n" if tls.getpeercert() is None else b"?\n")
    await writer.drain()
    writer.close()


def _load(context: ssl.SSLContext, svid: X509Svid) -> None:
    from sdk.tls_material import load_identity  # the same memfd hand-over the SDK uses

    load_identity(context, svid.cert_chain, svid.private_key)


def test_peer_spiffe_id_of_a_connection_without_one() -> None:
    plain = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())

    with pytest.raises(AuthenticationError) as refused:
        peer_spiffe_id(plain)

    assert str(refused.value) == (
        "this TLS connection has no authorized SPIFFE ID: it was not made with a context "
        "from sdk.tls, or its handshake has not completed"
    )


def test_a_source_without_bundles(ca: TestCA) -> None:
    with pytest.raises(SourceError) as refused:
        mtls_server_context(StaticX509Source(ca.issue_x509_svid(API_ID), []), authorize_any())

    assert str(refused.value) == "the source holds no X.509 bundle, so no peer can be verified"


# -- rotation -----------------------------------------------------------------------------


def test_new_handshakes_use_the_rotated_svid_and_open_connections_keep_working(
    serve: Any, ca: TestCA, api_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    server = serve(api_source, authorize_id(WEB_ID))
    client_context = mtls_client_context(web_source, authorize_id(API_ID))
    first = Client(client_context, server.port)
    assert first.say("before") == f"{WEB_ID} says before"
    old_server, old_client = api_source.x509_svid(), web_source.x509_svid()

    api_source.update(svid=ca.issue_x509_svid(API_ID))
    web_source.update(svid=ca.issue_x509_svid(WEB_ID))
    second = Client(client_context, server.port)

    assert second.server_serial() == api_source.x509_svid().leaf.serial_number
    assert second.server_serial() != old_server.leaf.serial_number
    assert second.say("after") == f"{WEB_ID} says after"
    assert [serial for _, serial in server.handled] == [
        old_client.leaf.serial_number,
        web_source.x509_svid().leaf.serial_number,
    ]
    assert first.say("still here") == f"{WEB_ID} says still here"
    first.close()
    second.close()


def test_a_new_ca_is_trusted_and_a_removed_one_refused_without_restart(
    serve: Any, ca: TestCA, api_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    server = serve(api_source, authorize_id(WEB_ID))
    client_context = mtls_client_context(web_source, authorize_id(API_ID))
    opened_first = Client(client_context, server.port)
    new_ca = TestCA(TRUST_DOMAIN)
    both = X509Bundle(ca.trust_domain, {ca.certificate, new_ca.certificate})

    # 1. the new CA is published to everyone, and the server moves to an SVID it signed
    web_source.update(bundles=[both])
    api_source.update(svid=new_ca.issue_x509_svid(API_ID), bundles=[both])
    across = Client(client_context, server.port)  # the client's SVID is still from the old CA
    assert across.say("across") == f"{WEB_ID} says across"

    # 2. the old CA leaves the server's bundle: the client's old SVID no longer passes
    api_source.update(bundles=[new_ca.bundle()])
    stale = Client(client_context, server.port)
    assert stale.is_cut_off()

    # 3. the client rotates onto the new CA too
    web_source.update(svid=new_ca.issue_x509_svid(WEB_ID), bundles=[new_ca.bundle()])
    renewed = Client(client_context, server.port)
    assert renewed.say("renewed") == f"{WEB_ID} says renewed"

    assert opened_first.say("still here") == f"{WEB_ID} says still here"
    for client in (opened_first, across, stale, renewed):
        client.close()


def test_material_openssl_refuses_keeps_the_previous_generation(
    serve: Any,
    ca: TestCA,
    api_source: StaticX509Source,
    web_source: StaticX509Source,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = serve(api_source, authorize_id(WEB_ID))
    serving = api_source.x509_svid()
    other = ca.issue_x509_svid(API_ID)
    mismatched = X509Svid(other.spiffe_id, other.cert_chain, serving.private_key)

    api_source.update(svid=mismatched)
    client = Client(mtls_client_context(web_source, authorize_id(API_ID)), server.port)

    assert client.server_serial() == serving.leaf.serial_number
    assert client.say("hi") == f"{WEB_ID} says hi"
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert message.startswith(
        "TLS server: keeping the previous SVID and bundles, the new ones do not load: "
        "OpenSSL does not accept the SVID or bundles: [X509: KEY_VALUES_MISMATCH]"
    )
    client.close()


def test_a_servers_alpn_protocols_survive_rotation(
    loop_thread: LoopThread,
    ca: TestCA,
    api_source: StaticX509Source,
    web_source: StaticX509Source,
) -> None:
    server_context = mtls_server_context(api_source, authorize_any())
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    server = EchoServer(loop_thread, server_context)
    client_context = mtls_client_context(web_source, authorize_any())
    client_context.set_alpn_protocols(["h2"])
    try:
        api_source.update(svid=ca.issue_x509_svid(API_ID))
        client = Client(client_context, server.port)
        assert client.server_serial() == api_source.x509_svid().leaf.serial_number
        assert client.tls.selected_alpn_protocol() == "h2"
        client.close()
    finally:
        server.close()


# -- session resumption (TLS 1.2) ---------------------------------------------------------


def test_a_resumed_session_is_authorized_again(
    serve: Any,
    api_source: StaticX509Source,
    web_source: StaticX509Source,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sdk.tls")
    calls: list[SpiffeId] = []
    refusing = threading.Event()

    def authorizer(peer_id: SpiffeId) -> None:
        calls.append(peer_id)
        if refusing.is_set():
            raise AuthorizationError(peer_id, "test", "no longer welcome")

    server = serve(api_source, authorizer)
    context = mtls_client_context(web_source, authorize_id(API_ID))
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # sessions are resumed by ID in TLS 1.2
    first = Client(context, server.port)
    assert first.say("hi") == f"{WEB_ID} says hi"
    session = first.tls.session
    first.close()

    resumed = Client(context, server.port, session=session)
    assert resumed.tls.session_reused
    assert resumed.say("again") == f"{WEB_ID} says again"
    resumed.close()

    refusing.set()
    refused = Client(context, server.port, session=session)
    assert refused.tls.session_reused
    assert refused.is_cut_off()
    refused.close()

    wait_until(lambda: refusals(caplog), "the server to log the refusal")
    assert refusals(caplog) == [
        "TLS server: refused the peer: spiffe://example.org/web refused by test: no longer welcome"
    ]
    assert calls == [SpiffeId(WEB_ID)] * 3
    assert len(server.handled) == 2


# -- a server rotating its own material ---------------------------------------------------


class Owner:
    """Material a server rotates itself, and how often its context asked for it."""

    def __init__(self, svid: X509Svid, bundles: list[X509Bundle]) -> None:
        self.material = TlsMaterial(svid.cert_chain, svid.private_key, bundles)
        self.version = 1
        self.loads = 0
        self.broken = False

    def load(self) -> TlsMaterial:
        self.loads += 1
        if self.broken:
            raise SourceError("the owner's SVID is not there")
        return self.material

    def rotate(self, svid: X509Svid) -> None:
        self.material = TlsMaterial(svid.cert_chain, svid.private_key, self.material.bundles)
        self.version += 1


@pytest.fixture
def who(loop_thread: LoopThread) -> Iterator[Any]:
    """Starts asyncio TLS servers answering a line with the caller's ID, or why it has none."""
    servers: list[asyncio.Server] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        try:
            caller = str(peer_spiffe_id(writer.get_extra_info("ssl_object")))
        except AuthenticationError as err:
            caller = err.message
        writer.write(caller.encode() + b"\n")
        await writer.drain()
        writer.close()

    def start(context: ssl.SSLContext) -> int:
        server = loop_thread.run(asyncio.start_server(answer, "127.0.0.1", 0, ssl=context))
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        loop_thread.close_server(server)


def test_a_client_certificate_may_be_optional(
    who: Any, ca: TestCA, api_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    owner = Owner(api_source.x509_svid(), [ca.bundle()])
    port = who(server_context(owner.load, version=lambda: owner.version,
                              authorizer=authorize_id(WEB_ID), client_certificate="optional"))
    anonymous = tls_client_context(web_source, authorize_id(API_ID))
    refused_source = StaticX509Source(ca.issue_x509_svid("spiffe://example.org/db"), [ca.bundle()])

    without = Client(anonymous, port)
    with_svid = Client(mtls_client_context(web_source, authorize_id(API_ID)), port)
    refused = Client(mtls_client_context(refused_source, authorize_id(API_ID)), port)

    assert without.say("who") == "the peer presented no certificate on this connection"
    assert with_svid.say("who") == WEB_ID
    assert refused.is_cut_off()
    for client in (without, with_svid, refused):
        client.close()


def test_an_anonymous_session_is_resumed(
    who: Any, ca: TestCA, api_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    owner = Owner(api_source.x509_svid(), [ca.bundle()])
    port = who(server_context(owner.load, version=lambda: owner.version,
                              authorizer=authorize_any(), client_certificate="optional"))
    context = tls_client_context(web_source, authorize_id(API_ID))
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # sessions are resumed by ID in TLS 1.2
    first = Client(context, port)
    assert first.say("who") == "the peer presented no certificate on this connection"
    session = first.tls.session
    first.close()

    resumed = Client(context, port, session=session)

    assert resumed.tls.session_reused
    assert resumed.say("who") == "the peer presented no certificate on this connection"
    resumed.close()


def test_the_owners_material_is_read_again_only_when_its_version_moves(
    who: Any, ca: TestCA, api_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    owner = Owner(api_source.x509_svid(), [ca.bundle()])
    port = who(server_context(owner.load, version=lambda: owner.version,
                              authorizer=authorize_any()))
    client_context = mtls_client_context(web_source, authorize_id(API_ID))
    before = [Client(client_context, port) for _ in range(3)]

    renewed = ca.issue_x509_svid(API_ID)
    owner.rotate(renewed)
    after = Client(client_context, port)

    assert {client.server_serial() for client in before} == {serial_of(api_source.x509_svid())}
    assert after.server_serial() == serial_of(renewed)
    assert after.say("who") == WEB_ID
    assert owner.loads == 2
    for client in (*before, after):
        client.close()


def test_material_its_owner_cannot_give_keeps_the_previous_generation(
    who: Any,
    ca: TestCA,
    api_source: StaticX509Source,
    web_source: StaticX509Source,
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = Owner(api_source.x509_svid(), [ca.bundle()])
    port = who(server_context(owner.load, version=lambda: owner.version,
                              authorizer=authorize_any()))
    owner.broken = True
    owner.version += 1

    client = Client(mtls_client_context(web_source, authorize_id(API_ID)), port)

    assert client.server_serial() == serial_of(api_source.x509_svid())
    assert client.say("who") == WEB_ID
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "TLS server: keeping the previous SVID and bundles, the new ones do not load: "
        "the owner's SVID is not there"
    ]
    client.close()


def test_without_an_authorizer_no_client_certificate_is_asked_for(
    who: Any, api_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    owner = Owner(api_source.x509_svid(), [])
    port = who(server_context(owner.load, version=lambda: owner.version, authorizer=None))

    client = Client(mtls_client_context(web_source, authorize_id(API_ID)), port)

    assert client.say("who") == "the peer presented no certificate on this connection"
    assert peer_spiffe_id(client.tls) == SpiffeId(API_ID)
    client.close()
