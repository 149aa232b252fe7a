"""The listeners' limits: the connection guard, and the request deadline the
protocol keeps, driven on a loop whose clock the test moves."""

from __future__ import annotations

import logging
import resource
import ssl
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

import pytest
from uvicorn.server import ServerState

from ca.api.limits import (
    HEAD_TOO_LARGE,
    MAX_HEAD_BYTES,
    REQUEST_TIMEOUT_RESPONSE,
    ConnectionGuard,
    LimitedProtocol,
    connections_per_listener,
    listener_config,
)
from ca.config import ConnectionLimits
from sdk.clock import ManualClock

LIMITS = ConnectionLimits(
    request_timeout=timedelta(seconds=10), idle_timeout=timedelta(seconds=5),
    max_connections=4, max_connections_per_peer=2,
)
HEAD_START = b"GET /live HTTP/1.1\r\nHost: tessera\r\n"


# -- a loop and a transport the test drives ---------------------------------------------


class Timer:
    def __init__(self, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args, self.cancelled = when, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Task:
    def add_done_callback(self, callback: Callable[..., None]) -> None:
        pass


class ManualLoop:
    """Enough of an event loop for the protocol: time moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> Timer:
        timer = Timer(when, callback, args)
        self.timers.append(timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Timer:
        return self.call_at(self.now + delay, callback, *args)

    def create_task(self, coro: Coroutine[Any, Any, Any], **_: Any) -> Task:
        coro.close()  # the app is not run: these tests are about the connection
        return Task()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while due := sorted((t for t in self.timers if not t.cancelled and t.when <= self.now),
                            key=lambda t: t.when):
            timer = due[0]
            self.timers.remove(timer)
            timer.callback(*timer.args)


class PeerCertificate:
    """The TLS object of a handshake whose client presented ``der`` (or nothing)."""

    def __init__(self, der: bytes | None) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self.der


class Transport:
    def __init__(self, peer: str | None, ssl_object: PeerCertificate | None = None) -> None:
        self.peer = peer
        self.ssl_object = ssl_object
        self.written = b""
        self.aborted = self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (self.peer, 40000) if self.peer else ""
        if name == "sockname":
            return ("127.0.0.1", 8081)
        if name == "ssl_object":
            return self.ssl_object
        return default

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.aborted or self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: Any, receive: Any, send: Any) -> None:
    pass


@pytest.fixture
def loop() -> ManualLoop:
    return ManualLoop()


@pytest.fixture
def guard() -> ConnectionGuard:
    return ConnectionGuard("node API", LIMITS.max_connections, LIMITS.max_connections_per_peer,
                           clock=ManualClock())


@pytest.fixture
def accept(loop: ManualLoop, guard: ConnectionGuard) -> Callable[..., LimitedProtocol]:
    """A connection accepted now, as the listener's uvicorn configuration makes it."""
    config = listener_config(app, guard, LIMITS, host="127.0.0.1", port=8081)
    state = ServerState()

    def accept() -> LimitedProtocol:
        protocol = config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=state, app_state={}, _loop=loop)
        assert isinstance(protocol, LimitedProtocol)
        return protocol

    return accept


def connect(
    protocol: LimitedProtocol, peer: str | None = "192.0.2.1", ssl_object: Any = None
) -> Transport:
    transport = Transport(peer, ssl_object)
    protocol.connection_made(transport)
    return transport


def answer(protocol: LimitedProtocol) -> None:
    """The app's response to the request, as uvicorn's cycle ends it."""
    protocol.cycle.response_complete = True
    protocol.on_response_complete()


# -- the request deadline ---------------------------------------------------------------


def test_a_head_that_never_ends_gets_a_408_and_the_connection_closes(loop, accept, guard):
    protocol = accept()
    transport = connect(protocol)
    protocol.data_received(HEAD_START)
    loop.advance(9.9)
    assert not transport.aborted
    loop.advance(0.1)
    assert transport.written == REQUEST_TIMEOUT_RESPONSE
    assert transport.aborted
    protocol.connection_lost(None)
    assert guard.open == 0


def test_trickling_bytes_does_not_move_the_deadline(loop, accept):
    protocol = accept()
    transport = connect(protocol)
    protocol.data_received(b"GET /live HTTP/1.1\r\n")
    for _ in range(9):
        loop.advance(1)
        protocol.data_received(b"X-Slow: 1\r\n")
        assert not transport.aborted
    loop.advance(1)
    assert transport.aborted


def test_the_tls_handshake_counts_toward_the_first_request(loop, accept):
    protocol = accept()  # accepted; the handshake takes 6 s
    loop.advance(6)
    transport = connect(protocol)
    protocol.data_received(HEAD_START)
    loop.advance(4)
    assert transport.aborted


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(loop, accept):
    protocol = accept()
    transport = connect(protocol)
    loop.advance(10)
    assert transport.aborted
    assert transport.written == b""


def test_a_whole_request_is_not_cut_while_the_app_answers(loop, accept):
    protocol = accept()
    transport = connect(protocol)
    protocol.data_received(HEAD_START + b"\r\n")
    loop.advance(60)  # a long poll, say
    assert not transport.is_closing()


def test_a_body_that_never_ends_disconnects_the_app_and_closes(loop, accept):
    protocol = accept()
    transport = connect(protocol)
    protocol.data_received(b"POST /v1/x HTTP/1.1\r\nHost: t\r\ncontent-length: 100\r\n\r\n{")
    loop.advance(10)
    assert transport.aborted
    assert transport.written == b""  # the app holds the response; it hears of a disconnect
    assert protocol.cycle.disconnected


def test_idle_connections_close_after_the_idle_timeout(loop, accept):
    protocol = accept()
    transport = connect(protocol)
    protocol.data_received(HEAD_START + b"\r\n")
    answer(protocol)
    loop.advance(4.9)
    assert not transport.is_closing()
    loop.advance(0.1)
    assert transport.closed


def test_each_later_request_has_its_own_deadline(loop, accept):
    protocol = accept()
    transport = connect(protocol)
    protocol.data_received(HEAD_START + b"\r\n")
    loop.advance(30)
    answer(protocol)
    loop.advance(4)
    protocol.data_received(HEAD_START)  # the next request begins, and never ends
    loop.advance(9.9)
    assert not transport.is_closing()
    loop.advance(0.1)
    assert transport.written == REQUEST_TIMEOUT_RESPONSE
    assert transport.aborted


@pytest.mark.parametrize("pieces", [True, False], ids=["in-pieces", "at-once"])
def test_a_head_over_the_bound_is_answered_400_and_closed(accept, pieces):
    protocol = accept()
    transport = connect(protocol)
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    fillers = [filler] * (MAX_HEAD_BYTES // len(filler) + 2)
    if pieces:  # the parser holds an unfinished header: the bytes count as they arrive
        protocol.data_received(HEAD_START)
        for piece in fillers:
            if transport.is_closing():
                break
            protocol.data_received(piece)
    else:
        protocol.data_received(HEAD_START + b"".join(fillers) + b"\r\n")
    assert transport.written.startswith(b"HTTP/1.1 400 ")
    assert transport.written.endswith(HEAD_TOO_LARGE.encode())
    assert transport.closed
    assert protocol.cycle is None  # the app never saw it


def test_a_head_under_the_bound_is_served(accept):
    protocol = accept()
    transport = connect(protocol)
    protocol.data_received(HEAD_START + b"X-Filler: " + b"a" * (MAX_HEAD_BYTES // 2) + b"\r\n\r\n")
    assert transport.written == b""
    assert protocol.cycle is not None and protocol.cycle.scope["path"] == "/live"


# -- the caller's certificate -----------------------------------------------------------


def test_each_request_carries_the_handshake_certificate(accept):
    protocol = accept()
    der = b"0\x03\x02\x01\x00"  # what the handshake verified; parsed by the app
    connect(protocol, ssl_object=PeerCertificate(der))
    chains = []
    for _ in range(2):
        protocol.data_received(HEAD_START + b"\r\n")
        chains.append(protocol.cycle.scope["extensions"]["tls"]["client_cert_chain"])
        answer(protocol)
    assert chains[0] == [ssl.DER_cert_to_PEM_cert(der)]
    assert chains[1] is chains[0]  # the same string: the app's parse of it is kept


@pytest.mark.parametrize("ssl_object", [None, PeerCertificate(None)], ids=["plain", "no-cert"])
def test_without_a_handshake_certificate_requests_carry_none(accept, ssl_object):
    protocol = accept()
    connect(protocol, ssl_object=ssl_object)
    protocol.data_received(HEAD_START + b"X-Client-Cert: forged\r\n\r\n")
    assert protocol.cycle.scope["extensions"] == {"tls": {"client_cert_chain": []}}


# -- the connection caps ----------------------------------------------------------------


def test_a_peer_over_its_cap_is_cut_at_once_and_others_are_not(accept, guard):
    first, second = connect(accept()), connect(accept())
    third_protocol = accept()
    third = connect(third_protocol)
    assert third.aborted and third.written == b""
    third_protocol.connection_lost(None)  # refused connections give back no place
    assert guard.open == 2 and guard.open_from("192.0.2.1") == 2
    assert not connect(accept(), peer="192.0.2.2").aborted
    assert not (first.aborted or second.aborted)


def test_a_place_given_back_is_taken_again(accept, guard):
    protocols = [accept(), accept()]
    for protocol in protocols:
        connect(protocol)
    protocols[0].connection_lost(None)
    assert not connect(accept()).aborted
    assert guard.open_from("192.0.2.1") == 2


def test_the_listener_cap_counts_unix_socket_callers(guard):
    admitted = [guard.admit(None) for _ in range(5)]
    assert admitted == [True, True, True, True, False]
    guard.release(None)
    assert guard.admit(None)


# -- one log line, not one per connection -----------------------------------------------


def test_refusals_and_timeouts_are_summed_into_one_line_per_interval(caplog):
    clock = ManualClock()
    guard = ConnectionGuard("node API", 2, 1, clock=clock)
    caplog.set_level(logging.WARNING, logger="ca.api.limits")
    assert guard.admit("192.0.2.1")
    assert not guard.admit("192.0.2.1")
    assert guard.admit("192.0.2.7")  # the listener is full now: it refuses anyone
    for _ in range(40):
        assert not guard.admit("192.0.2.1")
        assert not guard.admit("192.0.2.9")
    guard.timed_out()
    assert [r.getMessage() for r in caplog.records] == [
        "node API: refused 1 connection(s) over max_connections_per_peer (1): 1 from 192.0.2.1"
    ]
    clock.advance(timedelta(seconds=10))
    guard.timed_out()
    assert [r.getMessage() for r in caplog.records][1:] == [
        "node API: refused 80 connection(s) over max_connections (2); "
        "closed 2 connection(s) that sent no whole request within request_timeout"
    ]


def test_the_report_names_the_peers_refused_most(caplog):
    clock = ManualClock()
    guard = ConnectionGuard("bundle endpoint", 100, 1, clock=clock)
    caplog.set_level(logging.WARNING, logger="ca.api.limits")
    for peer in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"):
        assert guard.admit(peer)
    for count, peer in ((3, "192.0.2.1"), (1, "192.0.2.2"), (2, "192.0.2.3"), (1, "192.0.2.4")):
        for _ in range(count):
            assert not guard.admit(peer)
    clock.advance(timedelta(seconds=10))
    guard.report()
    assert [r.getMessage() for r in caplog.records] == [
        "bundle endpoint: refused 1 connection(s) over max_connections_per_peer (1): "
        "1 from 192.0.2.1",
        "bundle endpoint: refused 6 connection(s) over max_connections_per_peer (1): "
        "2 from 192.0.2.1, 2 from 192.0.2.3, 1 from 192.0.2.2 and 1 more address(es)",
    ]


# -- the file descriptor budget ---------------------------------------------------------


def test_a_cap_that_does_not_fit_the_open_files_limit_is_lowered(monkeypatch, caplog):
    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 256))
    caplog.set_level(logging.WARNING, logger="ca.api.limits")
    assert connections_per_listener(ConnectionLimits(max_connections=1024), 3) == 64
    assert caplog.records[0].getMessage() == (
        "max_connections 1024 does not fit the limit of 256 open files: each of the 3 "
        "listener(s) accepts at most 64 connections; raise the limit (ulimit -n) to allow more"
    )


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(monkeypatch):
    raised: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: raised.append(value))
    assert connections_per_listener(ConnectionLimits(max_connections=1024), 3) == 1024
    assert raised == [(65536, 65536)]
