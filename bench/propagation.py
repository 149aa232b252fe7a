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
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from grpclib.client import Channel

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
from workload_api._proto import workload_grpc, workload_pb2

NAME = "propagation"
ALIAS = f"spiffe://{TRUST_DOMAIN}/node/propagation"
MESH_ALIAS = f"spiffe://{TRUST_DOMAIN}/node/mesh-propagation"
POLL_SECONDS = 0.002
METADATA = {"workload.spiffe.io": "true"}
TARGET_P99 = 1.0
TARGET_SYNC_CPU = 0.001
_pb: Any = workload_pb2


@dataclass(frozen=True)
class Sizes:
    creations: int
    stored_entries: int
    nodes: int
    syncs: int
    applies: int


FULL = Sizes(creations=50, stored_entries=100_000, nodes=1000, syncs=1000, applies=50)
QUICK = Sizes(creations=3, stored_entries=200, nodes=10, syncs=20, applies=3)


def run(quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        latencies, admin_calls = propagation(Path(tmp), sizes)
        mesh_latencies, mesh_calls = mesh_propagation(Path(tmp), sizes)
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
