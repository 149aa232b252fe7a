"""HTTP/1.1 parsers for the built-in proxy: CPU per message, h11 against httptools (llhttp).

What the proxy does with each request it judges: parse a typical request head
(nine fields), serialise it again for the app, parse the app's response head,
and decode a chunked body of four 1 KiB chunks with a trailer. Each figure is
the best of five runs of ``--rounds`` iterations, in microseconds of CPU
(``time.process_time``) per iteration, in this one process.

    python bench/http_parsers.py [--rounds 20000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import h11
import httptools

REQUEST = (
    b"POST /api/v1/orders/1234?expand=items HTTP/1.1\r\n"
    b"Host: orders.default.svc\r\n"
    b"User-Agent: checkout/2.3 (+python-httpx)\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Content-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"X-Request-Id: 5f0c2a1e-8f7d-4b36-9d2a-0b1c2d3e4f50\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 512\r\n"
    b"Date: Fri, 04 Dec 2026 21:00:00 GMT\r\n"
    b"Server: uvicorn\r\n"
    b"\r\n"
)
CHUNKED_BODY = b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(4)) + (
    b"0\r\nX-Checksum: 9\r\n\r\n"
)


def _serialise(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1"] + [n + b": " + v for n, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _Collect:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.done = True


def httptools_request() -> bytes:
    collected = _Collect()
    parser = httptools.HttpRequestParser(collected)
    parser.feed_data(REQUEST)
    wire = _serialise(parser.get_method(), collected.url, collected.headers)
    parser.feed_data(CHUNKED_BODY)
    assert collected.done
    response = _Collect()
    httptools.HttpResponseParser(response).feed_data(RESPONSE)
    return wire


def h11_request() -> bytes:
    server = h11.Connection(h11.SERVER)
    server.receive_data(REQUEST + CHUNKED_BODY)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    client = h11.Connection(h11.CLIENT)
    wire = client.send(request)
    assert wire is not None
    while not isinstance(server.next_event(), h11.EndOfMessage):
        pass
    app = h11.Connection(h11.CLIENT)
    app.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    app.send(h11.EndOfMessage())
    app.receive_data(RESPONSE)
    assert isinstance(app.next_event(), h11.Response)
    return wire


def _best(action: Callable[[], bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(rounds):
            action()
        best = min(best, time.process_time() - start)
    return best / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    rounds = parser.parse_args().rounds
    for name, action in (("httptools", httptools_request), ("h11", h11_request)):
        print(f"{name:10} {_best(action, rounds):7.1f} µs CPU per request + response")


if __name__ == "__main__":
    main()
