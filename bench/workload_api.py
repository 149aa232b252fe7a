"""Workload API: latency of the first FetchX509SVID message with 1,000 clients connected,
and the time one rotation takes to reach 1,000 open streams.

Against a real ``tessera agent run`` (attesting every caller with the unix
workload attestor, as in production), joined to a real server, holding one
SVID for this process's uid. The clients are grpclib channels in this one
asyncio process, with the ``workload.spiffe.io: true`` metadata:

- *burst*: 1,000 clients open a FetchX509SVID stream at the same moment; the
  latency of each first message is mostly time spent queueing behind the others;
- *probe*: with those 1,000 streams open, new clients open a stream one at a
  time; this is the latency a workload sees on a loaded agent (the target);
- *rotation*: the entry's SVID TTL is changed through the admin API; the agent
  signs a new SVID and every open stream receives it. Fan-out is the spread
  between the first and the last of the 1,000 streams to receive it.

Ceiling from the same run: a bare grpclib server in its own process that
sends the same message (no header check, no attestation), driven by the same
clients.

    python bench/run.py --only workload_api
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.server import Server as GrpcServer
from grpclib.server import Stream

from bench.deployment import TRUST_DOMAIN, entry_body, running_agent, running_server
from bench.machine import ProcessMeter, percentile, profiled
from bench.report import Figure
from workload_api._proto import workload_grpc, workload_pb2

NAME = "workload_api"
ALIAS = f"spiffe://{TRUST_DOMAIN}/node/workload-api"
METADATA = {"workload.spiffe.io": "true"}
TARGET_P99 = 0.005
TARGET_FANOUT = 1.0
_pb: Any = workload_pb2
REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    clients: int
    probes: int


FULL = Sizes(clients=1000, probes=200)
QUICK = Sizes(clients=20, probes=10)


@dataclass
class Measured:
    burst: list[float]
    probes: list[float]
    fanout: float
    trigger_to_last: float
    message: bytes
    cpu_per_call: float
    """Server CPU seconds per FetchX509SVID call during the burst."""


def run(quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp, \
            running_server(Path(tmp) / "server") as server, \
            running_agent(server, Path(tmp) / "agent", alias=ALIAS, settings={
                # Every client is this process's uid: lift the agent's per-uid cap (128).
                "workload_api_max_connections_per_uid": sizes.clients + sizes.probes + 16,
            }) as agent:
        body = entry_body(f"spiffe://{TRUST_DOMAIN}/workload", ALIAS, [f"unix:uid:{os.getuid()}"])
        entry = server.create_entries([body])[0]
        agent.wait_for_svids(1, timeout=30)

        def rotate() -> None:
            body["x509_svid_ttl"] = 1800 if body.get("x509_svid_ttl") != 1800 else 2400
            server.admin.put(f"/v1/entries/{entry['id']}", json=body)

        with profiled(agent.pid, "workload-api-agent"):
            tessera = asyncio.run(measure(agent.socket_path, agent.pid, sizes, rotate))
    with bare_server(tessera.message) as (socket_path, bare_pid):
        bare = asyncio.run(measure(socket_path, bare_pid, sizes,
                                   lambda: os.kill(bare_pid, signal.SIGUSR1)))
    n = sizes.clients
    return [
        Figure(NAME, "agent CPU per FetchX509SVID call (burst)", tessera.cpu_per_call * 1000,
               " ms", ceiling=f"{bare.cpu_per_call * 1000:.3f} ms bare grpclib"),
        _latency(f"first message, {n} clients at once: p50", tessera.burst, bare.burst, 0.5),
        _latency(f"first message, {n} clients at once: p99", tessera.burst, bare.burst, 0.99),
        _latency(f"first message, new client, {n} streams open: p50", tessera.probes,
                 bare.probes, 0.5),
        _latency(f"first message, new client, {n} streams open: p99", tessera.probes,
                 bare.probes, 0.99, target=TARGET_P99),
        Figure(NAME, f"rotation fan-out to {n} streams (first to last)", tessera.fanout * 1000,
               " ms", ceiling=f"{bare.fanout * 1000:,.1f} ms bare grpclib",
               target=f"< {TARGET_FANOUT * 1000:,.0f} ms", met=tessera.fanout < TARGET_FANOUT),
        Figure(NAME, f"rotation: admin API change to the last of {n} streams",
               tessera.trigger_to_last * 1000, " ms",
               ceiling=f"{bare.trigger_to_last * 1000:,.1f} ms bare grpclib (signal to last)"),
    ]


def _latency(measure: str, tessera: list[float], bare: list[float], fraction: float,
             target: float | None = None) -> Figure:
    value = percentile(tessera, fraction)
    return Figure(
        NAME, measure, value * 1000, " ms",
        ceiling=f"{percentile(bare, fraction) * 1000:,.2f} ms bare grpclib",
        target=f"< {target * 1000:.0f} ms" if target is not None else "",
        met=value < target if target is not None else None,
    )


async def measure(socket_path: Path, server_pid: int, sizes: Sizes,
                  rotate: Callable[[], None]) -> Measured:
    channels = [Channel(path=str(socket_path)) for _ in range(sizes.clients)]
    first: list[float] = [0.0] * sizes.clients
    second: list[float] = [0.0] * sizes.clients
    all_open = asyncio.Event()
    opened = 0
    message = b""

    async def client(index: int) -> None:
        nonlocal opened, message
        stub = workload_grpc.SpiffeWorkloadAPIStub(channels[index])
        began = time.perf_counter()
        async with stub.FetchX509SVID.open(metadata=METADATA) as stream:
            await stream.send_message(_pb.X509SVIDRequest(), end=True)
            response = await stream.recv_message()
            first[index] = time.perf_counter() - began
            if response is None:
                raise RuntimeError("the Workload API ended the stream without a message")
            message = response.SerializeToString()
            opened += 1
            if opened == sizes.clients:
                all_open.set()
            await stream.recv_message()
            second[index] = time.perf_counter()
            await stream.cancel()

    await _probe(socket_path)  # warm up both ends (lazy imports, first-call caches)
    meter = ProcessMeter(server_pid)
    tasks = [asyncio.create_task(client(i)) for i in range(sizes.clients)]
    try:
        await _first_done(all_open.wait(), tasks, timeout=120)
        cpu_per_call = meter.cpu_seconds() / sizes.clients
        probes = [await _probe(socket_path) for _ in range(sizes.probes)]
        triggered = time.perf_counter()
        await asyncio.to_thread(rotate)
        await _first_done(asyncio.gather(*tasks), tasks, timeout=60)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            channel.close()
    return Measured(burst=first, probes=probes, fanout=max(second) - min(second),
                    trigger_to_last=max(second) - triggered, message=message,
                    cpu_per_call=cpu_per_call)


async def _first_done(awaitable: Awaitable[Any], tasks: list[asyncio.Task[None]],
                      timeout: float) -> None:
    """Await ``awaitable``; a client that failed meanwhile raises its error instead."""
    waiter = asyncio.ensure_future(awaitable)
    failed = asyncio.ensure_future(_any_failure(tasks))
    done, _ = await asyncio.wait({waiter, failed}, timeout=timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    failed.cancel()
    if waiter not in done:
        waiter.cancel()
        if failed in done and failed.exception() is not None:
            raise failed.exception()  # type: ignore[misc]
        raise TimeoutError(f"the Workload API clients did not finish in {timeout:.0f}s")


async def _any_failure(tasks: list[asyncio.Task[None]]) -> None:
    for finished in asyncio.as_completed(tasks):
        await finished  # raises the first client error


async def _probe(socket_path: Path) -> float:
    channel = Channel(path=str(socket_path))
    try:
        stub = workload_grpc.SpiffeWorkloadAPIStub(channel)
        began = time.perf_counter()
        async with stub.FetchX509SVID.open(metadata=METADATA) as stream:
            await stream.send_message(_pb.X509SVIDRequest(), end=True)
            await stream.recv_message()
            latency = time.perf_counter() - began
            await stream.cancel()
        return latency
    finally:
        channel.close()


# -- the ceiling: a bare grpclib server sending the same message ------------------------


@contextlib.contextmanager
def bare_server(message: bytes) -> Any:
    """A bare Workload API server in its own process; yields (socket path, pid)."""
    with tempfile.TemporaryDirectory(prefix="tessera-bare-") as tmp:
        socket_path = Path(tmp) / "bare.sock"
        message_path = Path(tmp) / "message.bin"
        message_path.write_bytes(message)
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.workload_api", "--serve", str(socket_path),
             str(message_path)],
            cwd=REPOSITORY, env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        )
        try:
            deadline = time.monotonic() + 20
            while not socket_path.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bare grpclib server did not start")
                time.sleep(0.05)
            yield socket_path, process.pid
        finally:
            process.terminate()
            process.wait(timeout=10)


class _BareWorkloadApi(workload_grpc.SpiffeWorkloadAPIBase):
    def __init__(self, message: Any, rotated: asyncio.Condition) -> None:
        self._message = message
        self._rotated = rotated

    async def FetchX509SVID(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_message(self._message)
        while True:
            async with self._rotated:
                await self._rotated.wait()
            await stream.send_message(self._message)

    async def FetchX509Bundles(self, stream: Stream[Any, Any]) -> None:
        raise NotImplementedError

    async def FetchJWTSVID(self, stream: Stream[Any, Any]) -> None:
        raise NotImplementedError

    async def FetchJWTBundles(self, stream: Stream[Any, Any]) -> None:
        raise NotImplementedError

    async def ValidateJWTSVID(self, stream: Stream[Any, Any]) -> None:
        raise NotImplementedError


async def _serve_bare(socket_path: str, message_path: str) -> None:
    message = _pb.X509SVIDResponse.FromString(Path(message_path).read_bytes())
    rotated = asyncio.Condition()
    loop = asyncio.get_running_loop()

    async def notify() -> None:
        async with rotated:
            rotated.notify_all()

    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(notify()))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = GrpcServer([_BareWorkloadApi(message, rotated)])
    await server.start(path=socket_path + ".tmp", backlog=4096)  # as the agent's
    os.rename(socket_path + ".tmp", socket_path)
    await stop.wait()
    server.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    asyncio.run(_serve_bare(sys.argv[2], sys.argv[3]))
