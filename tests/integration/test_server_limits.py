"""Slow and greedy clients against a real ``tessera server run`` (ca/api/limits.py).

An attacker needs no certificate to reach the node API. These tests hold
connections open the ways a slowloris does — a handshake never finished, a
request head trickled a byte at a time, connection after connection from one
address — and check that the server closes them and that an agent (from
another address) and the admin socket are still served meanwhile. The limits
are configured to a second or so, and every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.agent_fixtures import (  # noqa: F401  (fixtures)
    AgentProcess,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import ServerProcess

pytestmark = pytest.mark.integration

DEADLINE = 15.0
ATTACKER = "127.0.0.2"  # loopback too, but another client address than the agent's
LIMITS = """\
tls_handshake_timeout = "1s"
request_timeout = "1s"
max_connections_per_client = 4
"""


@pytest.fixture
def server(start_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[ServerProcess]:
    config = tmp_path / "server.toml"
    config.write_text(LIMITS)
    running = start_server(extra=["--config", str(config)])
    yield running
    assert running.healthy(), running.log()  # it closed them; it did not fall over


def _tcp(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE,
                                    source_address=(ATTACKER, 0))
    return sock


def _tls(server: ServerProcess) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the attacker does not care who the server is
    return context.wrap_socket(_tcp(server))


def _closed_by_server(sock: socket.socket, trickle: bytes = b"") -> bytes:
    """Read (sending ``trickle`` a byte per read timeout meanwhile) until the server closes
    the connection; what it said. Fails if it is still open after DEADLINE."""
    said = b""
    sock.settimeout(0.2)
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if trickle:
            with contextlib.suppress(OSError):
                sock.sendall(trickle[:1])
            trickle = trickle[1:] or b"X"
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except (ConnectionResetError, ssl.SSLError):
            return said
        if not data:
            return said
        said += data
    raise AssertionError(f"the server kept the connection open for {DEADLINE}s")


@contextlib.contextmanager
def _held(make: Callable[[], socket.socket], count: int) -> Iterator[list[socket.socket]]:
    sockets = [make() for _ in range(count)]
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_a_handshake_never_finished_is_closed(server: ServerProcess) -> None:
    with _tcp(server) as sock:
        sock.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, and no more
        assert _closed_by_server(sock) == b""


def test_a_request_head_trickled_a_byte_at_a_time_is_closed_with_408(
    server: ServerProcess,
) -> None:
    with _tls(server) as sock:
        sock.sendall(b"GET /live HTTP/1.1\r\nHost: tessera\r\n")
        said = _closed_by_server(sock, trickle=b"X-Slow: " + b"a" * 100)
    assert said.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), said
    assert "no whole request within 1s (request_timeout)" in server.log()


def test_a_body_trickled_a_byte_at_a_time_is_closed(server: ServerProcess) -> None:
    with _tls(server) as sock:
        sock.sendall(b"POST /v1/agent/attest HTTP/1.1\r\nHost: tessera\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        said = _closed_by_server(sock, trickle=b'"a"' * 100)
    assert said.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), said


def test_a_connection_that_sends_nothing_after_its_handshake_is_closed(
    server: ServerProcess,
) -> None:
    with _tls(server) as sock:
        assert _closed_by_server(sock) == b""


def test_one_client_holds_at_most_its_share_and_agents_are_still_served(
    start_server: Callable[..., ServerProcess], start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    """Four idle TLS connections from the attacker's address (a request deadline long
    enough that they stay open meanwhile): the fifth is closed right after its handshake,
    while an agent (from 127.0.0.1) attests and the admin socket answers."""
    config = tmp_path / "server.toml"
    config.write_text('request_timeout = "60s"\nmax_connections_per_client = 4\n')
    server = start_server(extra=["--config", str(config)])
    with _held(lambda: _tls(server), 4) as held:
        with _tls(server) as fifth:
            assert _closed_by_server(fifth) == b""
        agent = start_agent(server)
        assert agent.ready()
        assert server.cli_json("healthcheck")["status"] == "serving"
        for sock in held:  # still open: the cap, not a timer, closed the fifth
            sock.settimeout(0.01)
            with pytest.raises(TimeoutError):
                sock.recv(1)
    log = server.log()
    assert (f"client {ATTACKER} already holds 4 connections, the most one client may hold "
            "(max_connections_per_client); closing its new connections until it has fewer"
            ) in log
    assert log.count(f"client {ATTACKER} already holds") == 1
