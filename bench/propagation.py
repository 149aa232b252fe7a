"""Propagation and sync cost: from ``entry create`` to the SVID in a waiting workload, from
``mesh apply`` to the agent holding the new mesh configuration, and the server CPU one
idle agent sync costs with 100,000 entries in the datastore.

*Propagation*: a real server and agent; this process keeps a FetchX509SVID
stream open on the agent, then creates ~50 entries for its own uid one after
the other through the admin API and times each from the admin call to the
stream message carrying the new SPIFFE ID (long poll wakes, the agent signs,
the stream pushes). The reference is the admin call alone.

*Mesh propagation*: a real server and agent; ~50 applies one after the other through the
admin API (``POST /v1/mesh/apply``, each changing a Service's port), each timed from the
admin call to the agent's ``tessera_agent_mesh_revision`` showing the apply's revision
(the long poll wakes, the agent fetches the change and applies it). The agent's
``/metrics`` is polled every 2 ms on one keep-alive connection, so the figure is within a
few milliseconds of the moment the agent learned it. The reference is the admin call
alone.

*Health propagation*: a real server and two agents. This process registers an instance
of a Service through agent A (``Mesh.Register``) whose TCP health check (every 100 ms)
reaches a socket it opens and closes in turn, and watches agent B's ``Mesh.WatchMesh``.
Each health change is timed from A's Register update announcing it (the moment A's
check decided, and A reports at once) to B's snapshot showing it (A's report, the
server's write, B's long poll waking, B's fetch). ~50 changes each way.

*Idle sync*: 100,000 entries under 1,000 node aliases are bulk-inserted with
SQLAlchemy ``executemany`` before a fresh server starts; an agent session
attested as one of those nodes (100 entries) then makes N idle round trips
``GET /v1/agent/entries?since=<current>&bundle=<current>&wait=0`` on one
keep-alive mTLS connection. Server CPU (from /proc) divided by N is the cost
of one idle sync; the reference is ``GET /live`` on the same connection.

    python bench/run.py --only propagation
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from grpclib.client import Channel
from grpclib.const import Cardinality

from bench.deployment import (
    TRUST_DOMAIN,
    NodeSession,
    Server,
    entry_body,
    running_agent,
    running_server,
    seed_entries,
)
from bench.machine import ProcessMeter, percentile, profiled
from bench.report import Figure
from ca.datastore.store import Datastore
from sdk._proto import mesh_agent_pb2
from workload_api._proto import workload_grpc, workload_pb2

NAME = "propagation"
ALIAS = f"spiffe://{TRUST_DOMAIN}/node/propagation"
MESH_ALIAS = f"spiffe://{TRUST_DOMAIN}/node/mesh-propagation"
POLL_SECONDS = 0.002
METADATA = {"workload.spiffe.io": "true"}
TARGET_P99 = 1.0
TARGET_SYNC_CPU = 0.001
_pb: Any = workload_pb2
_mesh_pb: Any = mesh_agent_pb2


@dataclass(frozen=True)
class Sizes:
    creations: int
    stored_entries: int
    nodes: int
    syncs: int
    applies: int


FULL = Sizes(creations=50, stored_entries=100_000, nodes=1000, syncs=1000, applies=50)
QUICK = Sizes(creations=3, stored_entries=200, nodes=10, syncs=20, applies=3)
HEALTH_ALIASES = (f"spiffe://{TRUST_DOMAIN}/node/health-a", f"spiffe://{TRUST_DOMAIN}/node/health-b")


def run(quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        latencies, admin_calls = propagation(Path(tmp), sizes)
        mesh_latencies, mesh_calls = mesh_propagation(Path(tmp), sizes)
        health_latencies = health_propagation(Path(tmp), sizes)
        sync_cpu, live_cpu, inserted = idle_sync_cost(Path(tmp), sizes)
    per_node = sizes.stored_entries // sizes.nodes
    return [
        Figure(NAME, "entry create -> SVID in a waiting workload: p50",
               percentile(latencies, 0.5) * 1000, " ms",
               ceiling=f"{percentile(admin_calls, 0.5) * 1000:.1f} ms the admin call alone"),
        Figure(NAME, "entry create -> SVID in a waiting workload: p99",
               percentile(latencies, 0.99) * 1000, " ms",
               ceiling=f"{percentile(admin_calls, 0.99) * 1000:.1f} ms the admin call alone",
               target=f"< {TARGET_P99 * 1000:,.0f} ms",
               met=percentile(latencies, 0.99) < TARGET_P99),
        Figure(NAME, "mesh apply -> the agent holds the new configuration: p50",
               percentile(mesh_latencies, 0.5) * 1000, " ms",
               ceiling=f"{percentile(mesh_calls, 0.5) * 1000:.1f} ms the admin call alone"),
        Figure(NAME, "mesh apply -> the agent holds the new configuration: p99",
               percentile(mesh_latencies, 0.99) * 1000, " ms",
               ceiling=f"{percentile(mesh_calls, 0.99) * 1000:.1f} ms the admin call alone",
               target=f"< {TARGET_P99 * 1000:,.0f} ms",
               met=percentile(mesh_latencies, 0.99) < TARGET_P99),
        Figure(NAME, "instance health change at agent A -> agent B holds it: p50",
               percentile(health_latencies, 0.5) * 1000, " ms",
               ceiling=f"{percentile(mesh_latencies, 0.5) * 1000:.1f} ms mesh apply -> agent"),
        Figure(NAME, "instance health change at agent A -> agent B holds it: p99",
               percentile(health_latencies, 0.99) * 1000, " ms",
               ceiling=f"{percentile(mesh_latencies, 0.99) * 1000:.1f} ms mesh apply -> agent",
               target=f"< {TARGET_P99 * 1000:,.0f} ms",
               met=percentile(health_latencies, 0.99) < TARGET_P99),
        Figure(NAME, f"server CPU per idle sync ({sizes.stored_entries:,} entries stored, "
               f"{per_node} for the agent)", sync_cpu * 1000, " ms",
               ceiling=f"{live_cpu * 1000:.2f} ms GET /live on the same connection",
               target=f"< {TARGET_SYNC_CPU * 1000:.0f} ms", met=sync_cpu < TARGET_SYNC_CPU,
               note=f"{inserted:,.0f} entries per CPU-second bulk insert"),
    ]


# -- entry create to SVID ------------------------------------------------------------------


def propagation(tmp: Path, sizes: Sizes) -> tuple[list[float], list[float]]:
    uid_selector = f"unix:uid:{os.getuid()}"
    with running_server(tmp / "propagation-server") as server, \
            running_agent(server, tmp / "propagation-agent", alias=ALIAS) as agent:
        server.create_entries([entry_body(f"spiffe://{TRUST_DOMAIN}/first", ALIAS,
                                          [uid_selector])])
        agent.wait_for_svids(1, timeout=30)
        with profiled(agent.pid, "propagation-agent"):
            return asyncio.run(_watch_and_create(server, agent.socket_path, sizes, uid_selector))


async def _watch_and_create(server: Server, socket_path: Path, sizes: Sizes, selector: str
                            ) -> tuple[list[float], list[float]]:
    channel = Channel(path=str(socket_path))
    latencies: list[float] = []
    admin_calls: list[float] = []
    try:
        stub = workload_grpc.SpiffeWorkloadAPIStub(channel)
        async with stub.FetchX509SVID.open(metadata=METADATA) as stream:
            await stream.send_message(_pb.X509SVIDRequest(), end=True)
            await stream.recv_message()
            for index in range(sizes.creations):
                spiffe_id = f"spiffe://{TRUST_DOMAIN}/propagated/{index}"
                body = entry_body(spiffe_id, ALIAS, [selector])
                began = time.perf_counter()
                call = asyncio.create_task(asyncio.to_thread(_timed_create, server, body))
                while True:
                    message = await asyncio.wait_for(stream.recv_message(), timeout=30)
                    if message is None:
                        raise RuntimeError("the agent ended the FetchX509SVID stream")
                    if any(svid.spiffe_id == spiffe_id for svid in message.svids):
                        break
                latencies.append(time.perf_counter() - began)
                admin_calls.append(await call)
            await stream.cancel()
    finally:
        channel.close()
    return latencies, admin_calls


def _timed_create(server: Server, body: dict[str, Any]) -> float:
    """Create one entry through the admin API; returns the seconds the call took."""
    began = time.perf_counter()
    server.admin.post("/v1/entries", json=body)
    return time.perf_counter() - began


# -- mesh apply to the agent ----------------------------------------------------------------

MESH_SERVICE = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users}}
spec:
  spiffeIds: [spiffe://{trust_domain}/users]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
"""


def mesh_propagation(tmp: Path, sizes: Sizes) -> tuple[list[float], list[float]]:
    """(seconds from each apply to the agent holding it, seconds of each admin call)."""
    with running_server(tmp / "mesh-server") as server, \
            running_agent(server, tmp / "mesh-agent", alias=MESH_ALIAS) as agent, \
            httpx.Client(base_url=f"http://127.0.0.1:{agent.health_port}", timeout=10) as metrics:

        def agent_revision() -> int:
            for line in metrics.get("/metrics").text.splitlines():
                if line.startswith("tessera_agent_mesh_revision "):
                    return int(float(line.split()[1]))
            raise RuntimeError("the agent's /metrics has no tessera_agent_mesh_revision")

        def apply(port: int) -> tuple[int, float]:
            text = MESH_SERVICE.format(trust_domain=TRUST_DOMAIN, port=port)
            began = time.perf_counter()
            answer = server.admin.post("/v1/mesh/apply", content=text.encode(),
                                       headers={"content-type": "application/yaml"})
            return int(answer["revision"]), time.perf_counter() - began

        def learned(revision: int, began: float, timeout: float = 30) -> float:
            while agent_revision() < revision:
                if time.perf_counter() - began > timeout:
                    raise RuntimeError(f"the agent did not reach mesh revision {revision} in "
                                       f"{timeout:.0f}s:\n{agent.log()}")
                time.sleep(POLL_SECONDS)  # each scrape costs the agent's loop too
            return time.perf_counter() - began

        first, _ = apply(1000)
        learned(first, time.perf_counter())
        latencies: list[float] = []
        admin_calls: list[float] = []
        with profiled(agent.pid, "mesh-propagation-agent"):
            for index in range(sizes.applies):
                began = time.perf_counter()
                revision, call = apply(1001 + index)
                latencies.append(learned(revision, began))
                admin_calls.append(call)
        return latencies, admin_calls


# -- instance health to another agent -------------------------------------------------------

HEALTH_SERVICE = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users}}
spec:
  spiffeIds: [spiffe://{trust_domain}/users]
  ports: [{{number: 80, protocol: HTTP}}]
  healthCheck: {{tcp: {{}}, interval: 100ms, timeout: 100ms}}
"""


def health_propagation(tmp: Path, sizes: Sizes) -> list[float]:
    """Seconds from agent A announcing each health change to agent B holding it."""
    uid_selector = f"unix:uid:{os.getuid()}"
    alias_a, alias_b = HEALTH_ALIASES
    with running_server(tmp / "health-server") as server, \
            running_agent(server, tmp / "health-agent-a", alias=alias_a) as agent_a, \
            running_agent(server, tmp / "health-agent-b", alias=alias_b) as agent_b:
        server.admin.post("/v1/mesh/apply", content=HEALTH_SERVICE.format(
            trust_domain=TRUST_DOMAIN).encode(), headers={"content-type": "application/yaml"})
        server.create_entries([
            entry_body(f"spiffe://{TRUST_DOMAIN}/users", alias_a, [uid_selector]),
            entry_body(f"spiffe://{TRUST_DOMAIN}/orders", alias_b, [uid_selector]),
        ])
        agent_a.wait_for_svids(1, timeout=30)
        agent_b.wait_for_svids(1, timeout=30)
        return asyncio.run(_health_changes(agent_a, agent_b, sizes.applies))


async def _health_changes(agent_a: Any, agent_b: Any, changes: int) -> list[float]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    announced: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    seen: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    channel_a = Channel(path=str(agent_a.socket_path))
    channel_b = Channel(path=str(agent_b.socket_path))

    async def follow_registration() -> None:
        async with channel_a.request("/tessera.agent.v1.Mesh/Register",
                                     Cardinality.UNARY_STREAM, _mesh_pb.RegisterRequest,
                                     _mesh_pb.RegisterUpdate, metadata=METADATA) as stream:
            await stream.send_message(_mesh_pb.RegisterRequest(
                service="users", spiffe_id=f"spiffe://{TRUST_DOMAIN}/users",
                address="127.0.0.1:18443", check_address=f"127.0.0.1:{port}"), end=True)
            async for update in stream:
                await announced.put((update.health, time.perf_counter()))

    async def follow_agent_b() -> None:
        async with channel_b.request("/tessera.agent.v1.Mesh/WatchMesh",
                                     Cardinality.UNARY_STREAM, _mesh_pb.WatchMeshRequest,
                                     _mesh_pb.MeshSnapshot, metadata=METADATA) as stream:
            await stream.send_message(_mesh_pb.WatchMeshRequest(), end=True)
            last = None
            async for snapshot in stream:
                instances = json.loads(snapshot.instances_json)
                health = instances[0]["health"] if instances else None
                if health != last and health is not None:
                    await seen.put((health, time.perf_counter()))
                last = health

    async def next_health(queue: asyncio.Queue[tuple[str, float]], health: str) -> float:
        while True:
            found, at = await asyncio.wait_for(queue.get(), 30)
            if found == health:
                return at

    tasks = [asyncio.create_task(follow_registration()), asyncio.create_task(follow_agent_b())]
    latencies: list[float] = []
    try:
        await next_health(seen, "healthy")
        await next_health(announced, "healthy")
        for _ in range(changes):
            for health in ("unhealthy", "healthy"):
                if health == "unhealthy":
                    listener.close()
                else:
                    listener = socket.create_server(("127.0.0.1", port))
                at_a = await next_health(announced, health)
                at_b = await next_health(seen, health)
                latencies.append(at_b - at_a)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        channel_a.close()
        channel_b.close()
        listener.close()
    return latencies


# -- idle sync -----------------------------------------------------------------------------


def idle_sync_cost(tmp: Path, sizes: Sizes) -> tuple[float, float, float]:
    """(server CPU s per idle sync, per GET /live, entries per CPU-second of the bulk insert)."""
    data_dir = tmp / "sync-server"
    data_dir.mkdir(mode=0o700)
    url = f"sqlite:///{data_dir.resolve() / 'datastore.sqlite3'}"
    Datastore.open(url).close()  # create the schema as the server would
    # SQLite works in this process: its CPU time is the insert's cost.
    began = time.process_time()
    seed_entries(url, [
        (f"spiffe://{TRUST_DOMAIN}/service/{i}", f"spiffe://{TRUST_DOMAIN}/node/{i % sizes.nodes}",
         f"uid:{i}")
        for i in range(sizes.stored_entries)
    ])
    inserted = sizes.stored_entries / max(time.process_time() - began, 1e-9)
    with running_server(data_dir) as server:
        session = NodeSession(server, server.join_token(f"spiffe://{TRUST_DOMAIN}/node/0"))
        try:
            with session.client() as client:
                first = client.get("/v1/agent/entries", params={"since": 0}).json()
                expected = sizes.stored_entries // sizes.nodes
                if len(first["entry_ids"]) != expected:
                    raise RuntimeError(f"the agent is authorized for {len(first['entry_ids'])} "
                                       f"entries, not {expected}")
                params = {"since": first["revision"], "bundle": first["bundle_sequence"],
                          "wait": 0}
                for _ in range(20):  # warm up
                    client.get("/v1/agent/entries", params=params)
                meter = ProcessMeter(server.pid)
                with profiled(server.pid, "idle-sync-server"):
                    for _ in range(sizes.syncs):
                        response = client.get("/v1/agent/entries", params=params)
                        if response.status_code != 200 or response.json()["entries"]:
                            raise RuntimeError(f"an idle sync answered {response.status_code}: "
                                               f"{response.text[:200]}")
                    sync_cpu = meter.cpu_seconds() / sizes.syncs
                meter.restart()
                for _ in range(sizes.syncs):
                    client.get("/live")
                live_cpu = meter.cpu_seconds() / sizes.syncs
        finally:
            session.close()
    return sync_cpu, live_cpu, inserted
