"""Slow and greedy clients cannot hold the server's listeners.

A real ``tessera server run`` with a one-second ``--request-timeout`` faces
clients that trickle bytes and never finish: a TLS handshake that never ends
(plain TCP to the node API), a request head that never ends (over TLS, with no
client certificate), the same on the admin socket. The server closes every one
of them, and while they are open an agent attests and the admin commands answer.
A peer over ``--max-connections-per-peer`` is closed at once, other peers are not.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.agent_fixtures import (  # noqa: F401 (fixtures)
    AgentProcess,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import ServerProcess, free_port

CLOSE_DEADLINE = 30.0
"""How long the test waits for the server to close a slow connection before it fails
(with --request-timeout 1s; unfixed, the loop's handshake timeout alone is 60 s)."""

HANDSHAKE_START = b"\x16\x03\x01\x02\x00"  # a TLS handshake record of 512 bytes, never sent whole


class SlowClient:
    """One connection that keeps sending a little and never finishes what it started."""

    def __init__(self, sock: socket.socket, first: bytes, drip: bytes) -> None:
        self.sock = sock
        self.drip = drip
        self.received = b""
        self.closed = False
        sock.sendall(first)
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_more(self) -> None:
        try:
            self.sock.send(self.drip)
        except (ssl.SSLWantWriteError, BlockingIOError):
            pass
        except OSError:
            self.closed = True

    def read(self) -> None:
        """Read what the server sent; an end of stream or a reset means it closed us."""
        while True:
            try:
                data = self.sock.recv(4096)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            except OSError:  # reset, or a TLS stream cut without close_notify
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            self.received += data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def tls_client(address: tuple[str, int], *, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TLS connection with no client certificate, as anyone on the network may make."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(address, timeout=10, source_address=(source, 0))
    return context.wrap_socket(raw)


def node_address(server: ServerProcess) -> tuple[str, int]:
    return ("127.0.0.1", server.port)


def slow_handshakes(server: ServerProcess, count: int) -> list[SlowClient]:
    return [SlowClient(socket.create_connection(node_address(server), timeout=10),
                       HANDSHAKE_START, b"\x00") for _ in range(count)]


def slow_heads(server: ServerProcess, count: int) -> list[SlowClient]:
    return [SlowClient(tls_client(node_address(server)), b"GET /live HTTP/1.1\r\n",
                       b"X-Slow: 1\r\n") for _ in range(count)]


def slow_admin_heads(server: ServerProcess, count: int) -> list[SlowClient]:
    clients = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(server.admin_socket))
        clients.append(SlowClient(sock, b"GET /v1/health HTTP/1.1\r\n", b"X-Slow: 1\r\n"))
    return clients


def trickle_until_closed(clients: list[SlowClient], deadline: float) -> list[SlowClient]:
    """Keep every client trickling until the server closes it; those still open at
    ``deadline`` are returned."""
    while time.monotonic() < deadline:
        waiting = [c for c in clients if not c.closed]
        if not waiting:
            return []
        # Wait for the server to send or close (a select, not a sleep), then trickle on.
        readable, _, _ = select.select(waiting, [], [], 0.25)
        for client in readable:
            client.read()
        for client in waiting:
            if not client.closed:
                client.send_more()
    return [c for c in clients if not c.closed]


@pytest.fixture
def slow_clients() -> Iterator[list[SlowClient]]:
    opened: list[SlowClient] = []
    yield opened
    for client in opened:
        client.close()


def node_api_live(server: ServerProcess) -> int:
    with httpx.Client(verify=False, timeout=10) as client:
        return client.get(f"https://{server.address}/live").status_code


def test_slow_clients_are_closed_and_the_server_keeps_serving(
    start_server: Callable[..., ServerProcess],
    start_agent: Callable[..., AgentProcess],
    slow_clients: list[SlowClient],
) -> None:
    server = start_server(extra=["--request-timeout", "1s"])
    handshakes = slow_handshakes(server, 20)
    heads = slow_heads(server, 20)
    admin = slow_admin_heads(server, 20)
    slow_clients += [*handshakes, *heads, *admin]

    # While they trickle: an agent attests and gets its SVID over the node API, the
    # admin socket answers, and so does the node API for a plain request.
    agent = start_agent(server)
    assert agent.ready()
    assert server.cli("healthcheck").stdout.strip() == "Server is healthy."
    assert node_api_live(server) == 200

    still_open = trickle_until_closed(slow_clients, time.monotonic() + CLOSE_DEADLINE)
    assert not still_open, (
        f"{len(still_open)} slow connection(s) still open:"
        f" {sum(c in still_open for c in handshakes)} handshake(s),"
        f" {sum(c in still_open for c in heads)} TLS head(s),"
        f" {sum(c in still_open for c in admin)} admin head(s)"
    )
    # A head that had begun is answered 408 before the close.
    timeout_answer = b"HTTP/1.1 408 Request Timeout\r\n"
    assert all(c.received.startswith(timeout_answer) for c in admin)
    assert all(c.received.startswith(timeout_answer) for c in heads)
    assert all(c.received == b"" for c in handshakes)
    # One line, not one per connection.
    timeouts = [line for line in server.log().splitlines() if "within request_timeout" in line]
    assert 1 <= len(timeouts) < 10, timeouts
    assert server.cli("healthcheck").stdout.strip() == "Server is healthy."
    assert node_api_live(server) == 200


def held_open(client: SlowClient) -> bool:
    """Whether the server has left the connection open (it answers what it can't finish
    with silence, so a select that finds nothing to read means open)."""
    readable, _, _ = select.select([client], [], [], 0)
    if readable:
        client.read()
    return not client.closed


def wait_closed(client: SlowClient, deadline: float) -> bool:
    while time.monotonic() < deadline:
        readable, _, _ = select.select([client], [], [], 0.25)
        if readable:
            client.read()
            if client.closed:
                return True
    return False


def idle_tls(address: tuple[str, int], source: str = "127.0.0.1") -> SlowClient:
    return SlowClient(tls_client(address, source=source), b"", b"")


def test_a_peer_over_its_connection_cap_is_closed_at_once(
    start_server: Callable[..., ServerProcess], slow_clients: list[SlowClient],
) -> None:
    server = start_server(extra=["--max-connections-per-peer", "3", "--request-timeout", "60s"])
    held = [idle_tls(node_address(server)) for _ in range(3)]
    slow_clients += held
    over = [idle_tls(node_address(server)) for _ in range(5)]  # the handshake passes; then cut
    slow_clients += over
    deadline = time.monotonic() + CLOSE_DEADLINE
    assert all(wait_closed(client, deadline) for client in over)
    assert all(held_open(client) for client in held)

    # Another address is another peer: it is served while 127.0.0.1 is at its cap.
    other = tls_client(node_address(server), source="127.0.0.2")
    other.sendall(b"GET /live HTTP/1.1\r\nHost: tessera\r\nConnection: close\r\n\r\n")
    assert other.recv(4096).startswith(b"HTTP/1.1 200 ")
    other.close()
    # So is the admin socket.
    assert server.cli("healthcheck").stdout.strip() == "Server is healthy."

    # A place given back is a place taken again.
    held[0].close()
    deadline = time.monotonic() + CLOSE_DEADLINE
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if node_api_live(server) == 200:
                break
    else:
        raise AssertionError("no connection was accepted after one of the peer's closed")

    refusals = [line for line in server.log().splitlines()
                if "over max_connections_per_peer (3)" in line]
    assert refusals and len(refusals) < 5, refusals
    assert "from 127.0.0.1" in refusals[0]


def test_limits_that_make_no_sense_are_refused(tmp_path: Path) -> None:
    server = ServerProcess(data_dir=tmp_path / "server", port=0,
                           extra=["--idle-timeout", "2s"])
    with pytest.raises(AssertionError) as refused:
        server.start()
    assert ("Error: idle-timeout 2s is too short: agents keep an idle connection for 4s, "
            "so it must be at least 5s") in str(refused.value)


def test_the_bundle_endpoint_is_held_to_the_same_limits(
    start_server: Callable[..., ServerProcess], tmp_path: Path, slow_clients: list[SlowClient],
) -> None:
    endpoint_port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(
        'request_timeout = "1s"\nmax_connections_per_peer = 2\n\n'
        f'[federation.bundle_endpoint]\naddress = "127.0.0.1:{endpoint_port}"\n'
    )
    server = start_server(extra=["--config", str(config)])
    endpoint = ("127.0.0.1", endpoint_port)
    heads = [SlowClient(tls_client(endpoint), b"GET / HTTP/1.1\r\n", b"X-Slow: 1\r\n")
             for _ in range(2)]
    slow_clients += heads
    over = idle_tls(endpoint)  # a third from the same address
    slow_clients.append(over)
    assert wait_closed(over, time.monotonic() + CLOSE_DEADLINE)

    assert not trickle_until_closed(heads, time.monotonic() + CLOSE_DEADLINE)
    assert all(c.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for c in heads)
    with httpx.Client(verify=False, timeout=10) as client:
        assert "keys" in client.get(f"https://127.0.0.1:{endpoint_port}/").json()
    log = server.log()
    assert "bundle endpoint: refused 1 connection(s) over max_connections_per_peer (2)" in log
    assert "ca.api.limits: node API" not in log  # its own guard: nothing counted there
