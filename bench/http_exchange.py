"""The built-in proxy's inbound HTTP exchange alone: CPU per request, in-process.

An :class:`~sdk.sidecar.http_exchange.HttpExchange` serves TLS connections on
loopback (as an inbound listener in HTTP mode does, with an observer told of
every request) and forwards to a trivial app; the clients and the app run in a
child process, so the CPU this process spends is the exchange's alone (and its
TLS). Each client connection sends keep-alive ``GET`` requests one after the
other; the app answers each with a 512-byte ``Content-Length`` body.

    python bench/http_exchange.py [--connections 32] [--seconds 5] [--profile FILE]

``--profile`` runs the exchange under cProfile and writes its statistics
(sorted by internal time, then by calls) to FILE, with the Python calls per request.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spiffe import SpiffeId

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.handshakes import write_certificates
from sdk.address import HostPort
from sdk.policy import Decision
from sdk.sidecar.http_exchange import ExchangeRecord, HttpExchange
from sdk.sidecar.streams import Stream

REQUEST = (
    b"GET /api/v1/users/42 HTTP/1.1\r\n"
    b"Host: users-service\r\n"
    b"User-Agent: wrk\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)
BODY = b"x" * 512
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: bench\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"\r\n" + BODY
)
PEER = SpiffeId("spiffe://bench.test/client")


class _Allow:
    def decide(self, peer_id: SpiffeId, method: str | None = None,
               path: str | None = None) -> Decision:
        return Decision(True, "allow-client", "the client may call")

    def at_handshake(self) -> _Allow:
        return self


class _Trace:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Observer:
    def __init__(self) -> None:
        self.count = 0

    def start(self, traceparent: str | None) -> _Trace:
        return _Trace()

    def finish(self, exchange: ExchangeRecord, trace: Any) -> None:
        self.count += 1


class _App(asyncio.Protocol):
    """Answers every request head it sees with :data:`RESPONSE`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4:]
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]


def _load(port: int, app_port: int, connections: int, seconds: float, bundle: str,
          ready: Any, done: Any) -> None:
    async def client(context: ssl.SSLContext, until: float, counts: list[int]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                       server_hostname="server.bench.test")
        n = 0
        while time.perf_counter() < until:
            writer.write(REQUEST)
            await reader.readexactly(len(RESPONSE))
            n += 1
        counts.append(n)
        writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_App, "127.0.0.1", app_port)
        ready.set()
        context = ssl.create_default_context(cafile=bundle)
        counts: list[int] = []
        until = time.perf_counter() + seconds
        await asyncio.gather(*(client(context, until, counts) for _ in range(connections)))
        done.put(sum(counts))
        server.close()

    asyncio.run(main())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(
    port: int, app_port: int, files: dict[str, Path]
) -> tuple[Any, _Observer, set[asyncio.Task[Any]]]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files["server.pem"], files["server.key"])
    observer = _Observer()
    tasks: set[asyncio.Task[Any]] = set()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        exchange = HttpExchange(
            Stream(reader, writer), PEER, forward=HostPort("127.0.0.1", app_port),
            policy=_Allow, identity_headers=[("X-Forwarded-Client-Spiffe-Id", str(PEER))],
            decided=lambda decision: None, listener="inbound[0]", observer=observer,
        )  # fmt: skip
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await exchange.run()
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(accepted, "127.0.0.1", port, ssl=context)
    return server, observer, tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_certificates(Path(tmp), ("server",))
        files = {**files, "server.pem": Path(tmp) / "server.pem",
                 "server.key": Path(tmp) / "server.key"}
        port, app_port = _free_port(), _free_port()
        ready, done = multiprocessing.Event(), multiprocessing.Queue()

        async def run() -> tuple[int, float, float]:
            server, observer, tasks = await _serve(port, app_port, files)
            load = multiprocessing.Process(target=_load, args=(
                port, app_port, args.connections, args.seconds, str(files["bundle.pem"]),
                ready, done))  # fmt: skip
            load.start()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, ready.wait)
            cpu, wall = time.process_time(), time.perf_counter()
            total = await loop.run_in_executor(None, done.get)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            load.join()
            server.close()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert observer.count >= total, (observer.count, total)
            return total, cpu, wall

        if args.profile is None:
            total, cpu, wall = asyncio.run(run())
        else:
            import cProfile
            import pstats

            profile = cProfile.Profile()
            total, cpu, wall = profile.runcall(asyncio.run, run())
            stats = pstats.Stats(profile)
            calls = stats.total_calls  # type: ignore[attr-defined]
            with args.profile.open("w") as out:
                out.write(f"{calls / total:.0f} Python calls per request\n")
                pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(60)
                pstats.Stats(profile, stream=out).sort_stats("ncalls").print_stats(60)
    print(f"{args.connections} connections: {total} requests in {wall:.1f} s, "
          f"{total / wall:.0f}/s, {cpu / total * 1e6:.0f} µs CPU per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
