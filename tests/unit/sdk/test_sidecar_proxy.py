"""The sidecar proxy in one process: real sockets, real TLS, a real HTTP app in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import X509Svid

from sdk.authorize import authorize_id
from sdk.integrations.httpx import httpx_client
from sdk.policy import Decision, Policy
from sdk.sidecar import http_exchange
from sdk.sidecar.config import (
    HostPort,
    InboundConfig,
    ListenerProtocol,
    OutboundConfig,
    ProxyConfig,
)
from sdk.sidecar.errors import SidecarConfigError
from sdk.sidecar.health import HealthServer
from sdk.sidecar.metrics import ProxyMetrics
from sdk.sidecar.proxy import Proxy, handshake_policy
from sdk.sources import StaticX509Source
from sdk.tls import mtls_client_context
from tests.unit.sdk.conftest import API_ID, WEB_ID, LoopThread, TestCA, wait_until

INTRUDER_ID = "spiffe://example.org/intruder"
OPS_ID = "spiffe://example.org/ops"
ANY_PORT = 0
BIG = 6 * 1024 * 1024

POLICY = Policy.from_dict(
    {
        "allow": [
            {"name": "web-reads", "ids": [WEB_ID], "methods": ["GET", "POST", "PUT"],
             "paths": ["/api", "/upgrade"]},
            {"name": "ops", "ids": [OPS_ID]},
        ],
        "deny": [
            {"name": "no-admin", "ids": [WEB_ID], "paths": ["/api/admin"]},
        ],
    },
    source="policy.toml",
)


# -- a plain HTTP app ---------------------------------------------------------------------


class App(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[dict[str, Any]]


class AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: App

    def do_GET(self) -> None:
        if self.path == "/upgrade":
            self._upgrade()
            return
        if self.path.startswith("/api/big"):
            size = len(self._body())
            self.send_response(200)
            self.send_header("Content-Length", str(BIG))
            self.send_header("X-Received", str(size))
            self.end_headers()
            self.wfile.write(b"b" * BIG)
            return
        body = self._body()
        record = {
            "method": self.command,
            "path": self.path,
            "headers": [[name.lower(), value] for name, value in self.headers.items()],
            "body": body.decode(),
        }
        self.server.requests.append(record)
        data = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_PUT = do_DELETE = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _upgrade(self) -> None:
        self.send_response(101)
        self.send_header("Upgrade", "echo")
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        while line := self.rfile.readline():
            self.wfile.write(b"echo " + line)
            self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def app() -> Iterator[App]:
    server = App(("127.0.0.1", 0), AppHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def port_of(app: App) -> int:
    return int(app.server_address[1])


# -- proxies ------------------------------------------------------------------------------


class Running:
    def __init__(self, loop: LoopThread, proxy: Proxy) -> None:
        self.loop = loop
        self.proxy = proxy
        loop.run(proxy.start())

    def port(self, name: str) -> int:
        return self.proxy.bound(name).port

    def sample(self, metric: str, **labels: str) -> float:
        value = self.proxy.metrics.registry.get_sample_value(metric, labels)
        return value or 0.0

    def stop(self) -> None:
        self.loop.run(self.proxy.stop(grace=1))


@pytest.fixture
def start(loop_thread: LoopThread) -> Iterator[Any]:
    started: list[Running] = []

    def run(config: ProxyConfig, source: StaticX509Source) -> Running:
        running = Running(loop_thread, Proxy(config, source))
        started.append(running)
        return running

    yield run
    for running in started:
        running.stop()


def inbound(forward: int, protocol: ListenerProtocol = ListenerProtocol.HTTP,
            policy: Policy = POLICY) -> ProxyConfig:  # fmt: skip
    listener = InboundConfig(
        name="in",
        listen=HostPort("127.0.0.1", ANY_PORT),
        forward=HostPort("127.0.0.1", forward),
        policy=policy,
        protocol=protocol,
    )
    return ProxyConfig(source="test", inbound=(listener,))


def outbound(upstream: int, expected: str = API_ID) -> ProxyConfig:
    listener = OutboundConfig(
        name="out",
        listen=HostPort("127.0.0.1", ANY_PORT),
        upstream=HostPort("127.0.0.1", upstream),
        accept="spiffe_id",
        accepted=(expected,),
    )
    return ProxyConfig(source="test", outbound=(listener,))


def source_for(ca: TestCA, spiffe_id: str) -> StaticX509Source:
    return StaticX509Source(ca.issue_x509_svid(spiffe_id), [ca.bundle()])


def tls_socket(source: StaticX509Source, port: int) -> ssl.SSLSocket:
    context = mtls_client_context(source, authorize_id(API_ID))
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw, server_hostname="api.test")


def read_response(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    status_line = stream.readline()
    assert status_line, "the connection closed"
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return status, headers, body


def header_values(record: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in record["headers"] if key == name]


def leaf_hash(svid: X509Svid) -> str:
    return hashlib.sha256(svid.leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- inbound, HTTP ------------------------------------------------------------------------


def test_an_allowed_request_reaches_the_app_with_the_callers_id_only(
    start: Any, app: App, ca: TestCA, api_source: StaticX509Source
) -> None:
    proxy = start(inbound(port_of(app)), api_source)
    web = source_for(ca, WEB_ID)

    with httpx_client(web, authorize_id(API_ID)) as client:
        response = client.get(
            f"https://127.0.0.1:{proxy.port('in')}/api/items?x=1",
            headers={"X-Forwarded-Client-Spiffe-Id": "spiffe://example.org/admin",
                     "X-Forwarded-Client-Cert": "URI=spiffe://example.org/admin"},
        )

    assert response.status_code == 200
    record = response.json()
    assert (record["method"], record["path"]) == ("GET", "/api/items?x=1")
    assert header_values(record, "x-forwarded-client-spiffe-id") == [WEB_ID]
    assert header_values(record, "x-forwarded-client-cert") == [
        f"By={API_ID};Hash={leaf_hash(web.x509_svid())};URI={WEB_ID}"
    ]
    assert proxy.sample("tessera_sidecar_decisions_total", listener="in", stage="handshake",
                        rule="web-reads", result="allowed") == 1  # fmt: skip
    assert proxy.sample("tessera_sidecar_decisions_total", listener="in", stage="request",
                        rule="web-reads", result="allowed") == 1  # fmt: skip
    assert proxy.sample("tessera_sidecar_handshake_seconds_count", listener="in") == 1
    assert proxy.sample("tessera_sidecar_bytes_total", listener="in", direction="out") > 0


def test_refused_requests_get_403_naming_the_rule_and_keep_the_connection(
    start: Any, app: App, ca: TestCA, api_source: StaticX509Source
) -> None:
    proxy = start(inbound(port_of(app)), api_source)

    with tls_socket(source_for(ca, WEB_ID), proxy.port("in")) as tls:
        stream = tls.makefile("rb")
        tls.sendall(b"DELETE /api/items HTTP/1.1\r\nHost: api\r\n\r\n"
                    b"POST /api/admin/users HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello"
                    b"GET /api/items HTTP/1.1\r\nHost: api\r\n\r\n")  # fmt: skip
        first = read_response(stream)
        second = read_response(stream)
        third = read_response(stream)

    assert first == (403, {"content-type": "text/plain; charset=utf-8", "content-length": "111",
                           "connection": "keep-alive"},
                     b"spiffe://example.org/web refused by policy rule 'default-deny': no allow "
                     b"rule matches it for DELETE /api/items\n")  # fmt: skip
    assert second[0] == 403
    assert second[2] == (b"spiffe://example.org/web refused by policy rule 'no-admin': denied by "
                         b"its ids for POST /api/admin/users\n")  # fmt: skip
    assert third[0] == 200
    assert [r["path"] for r in app.requests] == ["/api/items"]
    assert proxy.sample("tessera_sidecar_decisions_total", listener="in", stage="request",
                        rule="default-deny", result="refused") == 1  # fmt: skip
    assert proxy.sample("tessera_sidecar_decisions_total", listener="in", stage="request",
                        rule="no-admin", result="refused") == 1  # fmt: skip


def test_a_peer_no_allow_rule_names_gets_403_with_the_reason_after_the_handshake(
    start: Any, app: App, ca: TestCA, api_source: StaticX509Source,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    proxy = start(inbound(port_of(app)), api_source)

    intruder = httpx_client(source_for(ca, INTRUDER_ID), authorize_id(API_ID))
    with caplog.at_level(logging.INFO, logger="tessera.policy"), intruder as client:
        response = client.get(f"https://127.0.0.1:{proxy.port('in')}/api/items")

    assert (response.status_code, response.headers["connection"], response.text) == (
        403, "close", "spiffe://example.org/intruder refused by policy rule 'default-deny': no "
        "allow rule matches it\n")  # fmt: skip
    assert app.requests == []
    assert proxy.sample("tessera_sidecar_handshake_failures_total", listener="in",
                        reason="refused") == 0  # fmt: skip
    assert proxy.sample("tessera_sidecar_decisions_total", listener="in", stage="handshake",
                        rule="default-deny", result="refused") == 1  # fmt: skip
    assert ("refused spiffe://example.org/intruder by rule 'default-deny': no allow rule "
            "matches it") in caplog.text  # fmt: skip


def test_the_handshake_policy_ignores_methods_and_paths_but_keeps_plain_denies() -> None:
    policy = Policy.from_dict({
        "allow": [{"name": "a", "ids": [WEB_ID], "paths": ["/x"]}],
        "deny": [{"name": "d1", "ids": [OPS_ID]}, {"name": "d2", "ids": [WEB_ID], "paths": ["/y"]}],
    })  # fmt: skip
    relaxed = handshake_policy(policy)
    assert [(r.name, r.paths) for r in relaxed.allow] == [("a", ())]
    assert [r.name for r in relaxed.deny] == ["d1"]


class Judge:
    """Another judge than a Policy: refuses OPS at the handshake, and DELETE requests."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decide(self, peer_id: Any, method: str | None = None, path: str | None = None
               ) -> Decision:  # fmt: skip
        allowed = str(peer_id) != OPS_ID if method is None else method != "DELETE"
        return Decision(allowed, self.name, f"{self.name} judged {method or 'the caller'}")

    def at_handshake(self) -> Judge:
        return self


def test_a_listener_may_be_judged_by_another_judge_replaced_while_connections_stay_open(
    loop_thread: LoopThread, app: App, ca: TestCA, api_source: StaticX509Source
) -> None:
    proxy = Proxy(inbound(port_of(app)), api_source, judges={"in": Judge("first")})
    running = Running(loop_thread, proxy)
    try:
        with tls_socket(source_for(ca, WEB_ID), running.port("in")) as tls:
            stream = tls.makefile("rb")
            tls.sendall(b"DELETE /api/items HTTP/1.1\r\nHost: api\r\n\r\n")
            refused = read_response(stream)
            proxy.listeners[0].set_policy(Judge("second"))  # type: ignore[attr-defined]
            tls.sendall(b"GET /anything HTTP/1.1\r\nHost: api\r\n\r\n")
            allowed = read_response(stream)
            tls.sendall(b"DELETE /api/items HTTP/1.1\r\nHost: api\r\n\r\n")
            refused_again = read_response(stream)
        with httpx_client(source_for(ca, OPS_ID), authorize_id(API_ID)) as client:
            ops = client.get(f"https://127.0.0.1:{running.port('in')}/api/items")
    finally:
        running.stop()

    assert (refused[0], refused[2]) == (
        403, f"{WEB_ID} refused by policy rule 'first': first judged DELETE\n".encode())
    assert allowed[0] == 200  # not a path POLICY allows: the judge decides, not the config
    assert refused_again[2] == (
        f"{WEB_ID} refused by policy rule 'second': second judged DELETE\n".encode())
    assert (ops.status_code, ops.text) == (
        403, f"{OPS_ID} refused by policy rule 'second': second judged the caller\n")
    assert running.sample("tessera_sidecar_decisions_total", listener="in", stage="handshake",
                          rule="second", result="refused") == 1  # fmt: skip


def test_bodies_chunked_and_with_100_continue_go_through(
    start: Any, app: App, ca: TestCA, api_source: StaticX509Source
) -> None:
    proxy = start(inbound(port_of(app)), api_source)

    with tls_socket(source_for(ca, WEB_ID), proxy.port("in")) as tls:
        stream = tls.makefile("rb")
        tls.sendall(b"POST /api/upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")  # fmt: skip
        chunked = read_response(stream)
        tls.sendall(b"PUT /api/doc HTTP/1.1\r\nHost: api\r\nContent-Length: 4\r\n"
                    b"Expect: 100-continue\r\n\r\n")  # fmt: skip
        interim = stream.readline()
        assert stream.readline() == b"\r\n"
        tls.sendall(b"data")
        final = read_response(stream)

    assert chunked[0] == 200 and json.loads(chunked[2])["body"] == "hello world"
    assert interim.startswith(b"HTTP/1.1 100")
    assert final[0] == 200 and json.loads(final[2])["body"] == "data"


def test_large_bodies_pass_both_ways_in_both_modes(
    start: Any, app: App, ca: TestCA, api_source: StaticX509Source
) -> None:
    http = start(inbound(port_of(app)), api_source)
    tcp = start(inbound(port_of(app), ListenerProtocol.TCP,
                        Policy.from_dict({"allow": [{"ids": [WEB_ID]}]})), api_source)
    upload = b"u" * BIG

    with httpx_client(source_for(ca, WEB_ID), authorize_id(API_ID), timeout=30) as client:
        for proxy in (http, tcp):
            response = client.post(f"https://127.0.0.1:{proxy.port('in')}/api/big", content=upload)
            assert (response.status_code, response.headers["x-received"]) == (200, str(BIG))
            assert response.content == b"b" * BIG
    assert http.sample("tessera_sidecar_bytes_total", listener="in", direction="in") > BIG


def test_an_upgrade_becomes_a_tunnel(
    start: Any, app: App, ca: TestCA, api_source: StaticX509Source
) -> None:
    proxy = start(inbound(port_of(app)), api_source)

    with tls_socket(source_for(ca, WEB_ID), proxy.port("in")) as tls:
        stream = tls.makefile("rb")
        tls.sendall(b"GET /upgrade HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\n"
                    b"Upgrade: echo\r\n\r\n")  # fmt: skip
        status, headers, _ = read_response(stream)
        tls.sendall(b"ping\n")
        assert stream.readline() == b"echo ping\n"

    assert (status, headers["upgrade"]) == (101, "echo")


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        (b"GET /api HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 40000 + b"\r\n\r\n", 431,
         b"the request headers are larger than 32768 bytes\n"),
        (b"GET /api\r\n\r\n", 400, b"the request line must be METHOD SP TARGET SP HTTP-VERSION\n"),
        (b"GET /api/../admin HTTP/1.1\r\nHost: a\r\n\r\n", 400,
         b"the request path has '.' or '..' segments or an empty segment once decoded "
         b"(path parameters after ';' aside); send it normalised\n"),
        (b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked"
         b"\r\n\r\n", 400, b"the request is not valid HTTP/1.1: Transfer-Encoding can't be present "
         b"with Content-Length\n"),
    ],
)
def test_malformed_requests_are_answered_by_the_sidecar(
    start: Any, app: App, ca: TestCA, api_source: StaticX509Source,
    request_bytes: bytes, status: int, body: bytes,
) -> None:  # fmt: skip
    proxy = start(inbound(port_of(app)), api_source)

    with tls_socket(source_for(ca, WEB_ID), proxy.port("in")) as tls:
        tls.sendall(request_bytes)
        answer = read_response(tls.makefile("rb"))

    assert (answer[0], answer[1]["connection"], answer[2]) == (status, "close", body)
    assert app.requests == []


def test_an_unreachable_app_is_a_503_as_envoy_answers_it(
    start: Any, ca: TestCA, api_source: StaticX509Source, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    proxy = start(inbound(closed_port), api_source)

    with caplog.at_level(logging.WARNING, logger="tessera.sidecar"), httpx_client(
        source_for(ca, WEB_ID), authorize_id(API_ID)
    ) as client:
        response = client.get(f"https://127.0.0.1:{proxy.port('in')}/api")

    assert (response.status_code, response.text) == (
        503, "the app behind this sidecar cannot be reached\n")
    assert f"cannot reach the app at 127.0.0.1:{closed_port}" in caplog.text


def test_new_connections_present_the_rotated_svid(
    start: Any, app: App, ca: TestCA, api_source: StaticX509Source
) -> None:
    proxy = start(inbound(port_of(app)), api_source)
    web = source_for(ca, WEB_ID)

    def served_serial() -> int:
        with tls_socket(web, proxy.port("in")) as tls:
            der = tls.getpeercert(binary_form=True)
            tls.sendall(b"GET /api HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(tls.makefile("rb"))[0] == 200
        return x509.load_der_x509_certificate(der).serial_number

    before = served_serial()
    rotated = ca.issue_x509_svid(API_ID)
    api_source.update(svid=rotated)
    assert served_serial() == rotated.leaf.serial_number != before


# -- inbound, TCP -------------------------------------------------------------------------


@pytest.fixture
def echo(loop_thread: LoopThread) -> Iterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(b"echo " + line)
            await writer.drain()
        writer.close()

    server = loop_thread.run(asyncio.start_server(handle, "127.0.0.1", 0))
    yield int(server.sockets[0].getsockname()[1])
    loop_thread.close_server(server)


def test_tcp_mode_splices_bytes_for_allowed_peers_only(
    start: Any, echo: int, ca: TestCA, api_source: StaticX509Source
) -> None:
    policy = Policy.from_dict({"allow": [{"ids": [WEB_ID]}]})
    proxy = start(inbound(echo, ListenerProtocol.TCP, policy), api_source)

    with tls_socket(source_for(ca, WEB_ID), proxy.port("in")) as tls:
        stream = tls.makefile("rb")
        tls.sendall(b"one\ntwo\n")
        assert [stream.readline(), stream.readline()] == [b"echo one\n", b"echo two\n"]

    with tls_socket(source_for(ca, INTRUDER_ID), proxy.port("in")) as tls:
        tls.sendall(b"one\n")
        with pytest.raises((ConnectionError, ssl.SSLError)):
            if not tls.recv(100):
                raise ConnectionResetError("closed")
    # The client sees the connection end before the proxy's loop has counted why.
    wait_until(lambda: proxy.sample("tessera_sidecar_decisions_total", listener="in",
                                    stage="handshake", rule="default-deny",
                                    result="refused") == 1,
               "the refusal being counted")  # fmt: skip


class UvloopThread(LoopThread):
    """A uvloop loop in a daemon thread: what ``tessera sidecar proxy`` runs on."""

    def __init__(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()


def test_tcp_mode_on_uvloop_completes_every_handshake(
    ca: TestCA, api_source: StaticX509Source
) -> None:
    """uvloop reads a connection as soon as its protocol is connected: an inbound listener
    that upgraded accepted connections with start_tls lost ClientHellos to the plain reader
    (the handshake then stalled until its timeout)."""
    pytest.importorskip("uvloop")
    loop = UvloopThread()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(b"echo " + line)
            await writer.drain()
        writer.close()

    echo_server = loop.run(asyncio.start_server(handle, "127.0.0.1", 0))
    policy = Policy.from_dict({"allow": [{"ids": [WEB_ID]}]})
    echo_port = int(echo_server.sockets[0].getsockname()[1])
    proxy = Running(loop, Proxy(inbound(echo_port, ListenerProtocol.TCP, policy), api_source))
    try:
        for n in range(20):
            with tls_socket(source_for(ca, WEB_ID), proxy.port("in")) as tls:  # 5 s timeout
                tls.sendall(f"{n}\n".encode())
                assert tls.makefile("rb").readline() == f"echo {n}\n".encode()
    finally:
        proxy.stop()
        loop.close_server(echo_server)
        loop.stop()


# -- outbound -----------------------------------------------------------------------------


def test_outbound_reaches_the_upstream_with_the_local_svid(
    start: Any, app: App, ca: TestCA, api_source: StaticX509Source
) -> None:
    server_side = start(inbound(port_of(app)), api_source)
    client_side = start(outbound(server_side.port("in")), source_for(ca, WEB_ID))

    response = httpx.get(f"http://127.0.0.1:{client_side.port('out')}/api/items", timeout=5)

    assert response.status_code == 200
    assert header_values(response.json(), "x-forwarded-client-spiffe-id") == [WEB_ID]
    allowed = {"listener": "out", "stage": "handshake", "rule": "spiffe_id", "result": "allowed"}
    assert client_side.sample("tessera_sidecar_decisions_total", **allowed) == 1


def test_outbound_refuses_an_upstream_with_another_id(
    start: Any, app: App, ca: TestCA, api_source: StaticX509Source,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    server_side = start(inbound(port_of(app)), api_source)
    client_side = start(outbound(server_side.port("in"), expected="spiffe://example.org/db"),
                        source_for(ca, WEB_ID))  # fmt: skip

    with caplog.at_level(logging.INFO, logger="tessera.sidecar"), pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{client_side.port('out')}/api/items", timeout=5)

    assert app.requests == []
    assert client_side.sample("tessera_sidecar_handshake_failures_total", listener="out",
                              reason="refused") == 1  # fmt: skip
    assert (
        "failed (refused): spiffe://example.org/api refused by authorize_id: expected "
        "spiffe://example.org/db" in caplog.text
    )


def test_the_client_side_counts_and_logs_a_refusal_by_a_tcp_upstream(
    start: Any, echo: int, ca: TestCA, api_source: StaticX509Source,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """In TCP mode the upstream's sidecar refuses in the handshake; TLS 1.3 gives the client no
    alert, only the connection closed before a byte: the client side names it."""
    only_ops = Policy.from_dict({"allow": [{"ids": [OPS_ID]}]})
    server_side = start(inbound(echo, ListenerProtocol.TCP, only_ops), api_source)
    client_side = start(outbound(server_side.port("in")), source_for(ca, WEB_ID))

    with caplog.at_level(logging.INFO, logger="tessera.sidecar"):
        with socket.create_connection(("127.0.0.1", client_side.port("out")), timeout=5) as plain:
            plain.sendall(b"one\n")
            # Closed without a byte: a FIN, or a reset when "one" was left unread.
            with contextlib.suppress(ConnectionResetError):
                assert plain.recv(100) == b""
        wait_until(lambda: client_side.sample("tessera_sidecar_handshake_failures_total",
                                              listener="out", reason="refused_by_upstream") == 1,
                   "the refusal being counted")  # fmt: skip

    assert (f"out: upstream 127.0.0.1:{server_side.port('in')} ({API_ID}) closed the connection "
            "right after the TLS handshake, before sending a byte: it most likely refused this "
            f"sidecar's SVID {WEB_ID}; its own log says why") in caplog.text  # fmt: skip


def test_the_client_side_does_not_count_its_own_app_hanging_up(
    start: Any, echo: int, ca: TestCA, api_source: StaticX509Source
) -> None:
    policy = Policy.from_dict({"allow": [{"ids": [WEB_ID]}]})
    server_side = start(inbound(echo, ListenerProtocol.TCP, policy), api_source)
    client_side = start(outbound(server_side.port("in")), source_for(ca, WEB_ID))

    with socket.create_connection(("127.0.0.1", client_side.port("out")), timeout=5) as plain:
        plain.sendall(b"one\n")
        assert plain.recv(100) == b"echo one\n"
    with socket.create_connection(("127.0.0.1", client_side.port("out")), timeout=5):
        pass
    wait_until(lambda: client_side.sample("tessera_sidecar_open_connections", listener="out") == 0,
               "both connections closed")  # fmt: skip

    assert client_side.sample("tessera_sidecar_handshake_failures_total", listener="out",
                              reason="refused_by_upstream") == 0  # fmt: skip


# -- health and shutdown ------------------------------------------------------------------


def test_health_endpoints(loop_thread: LoopThread, start: Any, app: App,
                          api_source: StaticX509Source) -> None:  # fmt: skip
    proxy = start(inbound(port_of(app)), api_source)
    problems: list[str | None] = ["starting"]
    health = HealthServer(HostPort("127.0.0.1", 0), proxy.proxy.metrics, ready=lambda: problems[-1])
    loop_thread.run(health.start())
    try:
        base = health.url
        assert httpx.get(f"{base}/live").json() == {"status": "live"}
        not_ready = httpx.get(f"{base}/ready")
        assert (not_ready.status_code, not_ready.json()) == (
            503, {"status": "not ready", "reason": "starting"})
        problems.append(None)
        assert httpx.get(f"{base}/ready").json() == {"status": "ready"}
        metrics = httpx.get(f"{base}/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        assert 'tessera_sidecar_connections_total{listener="in"} 0.0' in metrics.text
        assert httpx.get(f"{base}/nope").status_code == 404
        assert httpx.post(f"{base}/ready").status_code == 405
    finally:
        loop_thread.run(health.stop())


@pytest.mark.parametrize(("setting", "named"), [
    ({}, "--health-bind"), ({"setting": "health_bind"}, "health_bind"),
])  # fmt: skip
def test_a_taken_health_address_names_the_setting_to_change(
    loop_thread: LoopThread, setting: dict[str, str], named: str
) -> None:
    first = HealthServer(HostPort("127.0.0.1", 0), ProxyMetrics(), ready=lambda: None)
    loop_thread.run(first.start())
    try:
        taken = first.bound
        second = HealthServer(taken, ProxyMetrics(), ready=lambda: None, **setting)
        with pytest.raises(SidecarConfigError) as raised:
            loop_thread.run(second.start())
        assert str(raised.value).startswith(f"cannot serve the health endpoints on {taken}: ")
        assert str(raised.value).endswith(f"; choose another {named} (or 0 to turn it off)")
    finally:
        loop_thread.run(first.stop())


def test_a_connection_is_closed_when_its_next_request_head_is_late(
    loop_thread: LoopThread, app: App, ca: TestCA, api_source: StaticX509Source,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The deadline runs from the end of the previous request, for each head anew; a late one
    (here half sent) ends the connection without an answer."""
    monkeypatch.setattr(http_exchange, "IDLE_TIMEOUT_SECONDS", 0.5)
    proxy = Proxy(inbound(port_of(app)), api_source)
    loop_thread.run(proxy.start())
    try:
        tls = tls_socket(source_for(ca, WEB_ID), proxy.bound("in").port)
        stream = tls.makefile("rb")
        for _ in range(3):
            tls.sendall(b"GET /api HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(stream)[0] == 200
        started = time.monotonic()
        tls.sendall(b"GET /api HTTP/1.1\r\nHo")
        assert stream.read() == b""  # the socket's own timeout (5 s) fails the test
        assert time.monotonic() - started >= 0.4
        tls.close()
    finally:
        loop_thread.run(proxy.stop())


def test_stop_closes_idle_connections_at_once(
    loop_thread: LoopThread, app: App, ca: TestCA, api_source: StaticX509Source
) -> None:
    proxy = Proxy(inbound(port_of(app)), api_source)
    loop_thread.run(proxy.start())
    tls = tls_socket(source_for(ca, WEB_ID), proxy.bound("in").port)
    stream = tls.makefile("rb")
    tls.sendall(b"GET /api HTTP/1.1\r\nHost: a\r\n\r\n")
    assert read_response(stream)[0] == 200

    loop_thread.run(proxy.stop(grace=30), timeout=5)  # the idle connection does not hold it up

    assert stream.read() == b""
    tls.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.bound("in").port), timeout=1).close()
