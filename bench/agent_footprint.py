"""Agent footprint: resident memory and idle CPU of one agent holding 10,000 entries and
their X509-SVIDs.

A real server and agent; the first 200 entries are created through the admin
API (httpx over the admin socket, eight requests at a time; their rate per
server CPU-second is reported), the rest with one SQL batch into the running server's database
(the admin API takes one entry per request, far too slow for 10,000 in a
five-minute run); then the bench waits until
the agent's ``tessera_agent_x509_svids`` gauge says it holds every SVID, lets
it settle, and reads VmRSS and the CPU it spends over 20 idle seconds (its
long poll returns every 5 s with the list of authorized entry IDs). The
reference next to each figure is the same agent measured before the entries
existed.

    python bench/run.py --only agent_footprint
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.deployment import (
    TRUST_DOMAIN,
    entry_body,
    running_agent,
    running_server,
    seed_entries,
)
from bench.machine import ProcessMeter, profiled, resident_bytes
from bench.report import Figure

NAME = "agent_footprint"
ALIAS = f"spiffe://{TRUST_DOMAIN}/node/footprint"
TARGET_RSS = 150 * 1024 * 1024
TARGET_IDLE = 0.02
MB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    entries: int
    idle_seconds: float
    baseline_seconds: float
    settle_seconds: float
    admin_sample: int


FULL = Sizes(entries=10_000, idle_seconds=20.0, baseline_seconds=5.0, settle_seconds=3.0,
             admin_sample=200)
QUICK = Sizes(entries=20, idle_seconds=1.0, baseline_seconds=0.5, settle_seconds=0.2,
              admin_sample=5)


def run(quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    n = sizes.entries
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp, \
            running_server(Path(tmp) / "server") as server, \
            running_agent(server, Path(tmp) / "agent", alias=ALIAS) as agent:
        time.sleep(sizes.settle_seconds)
        empty_rss = resident_bytes(agent.pid)
        meter = ProcessMeter(agent.pid)
        time.sleep(sizes.baseline_seconds)
        empty_idle = meter.cores_busy()

        sample = min(n, sizes.admin_sample)
        server_meter = ProcessMeter(server.pid)
        server.create_entries([
            entry_body(f"spiffe://{TRUST_DOMAIN}/footprint/{i}", ALIAS, [f"unix:uid:{900000 + i}"])
            for i in range(sample)
        ])
        admin_rate = sample / max(server_meter.cpu_seconds(), 1e-9)
        admin_wall_rate = sample / server_meter.wall_seconds()
        # The rest in one SQL batch: at the admin API's rate 10,000 would take minutes.
        # The uids are ones no process has: the entries are held, not served.
        began = time.perf_counter()
        agent_meter = ProcessMeter(agent.pid)
        server_meter.restart()
        seed_entries(server.database_url, [
            (f"spiffe://{TRUST_DOMAIN}/footprint/{i}", ALIAS, f"uid:{900000 + i}")
            for i in range(sample, n)
        ])
        agent.wait_for_svids(n, timeout=300)
        held = time.perf_counter() - began
        held_cpu = (agent_meter.cpu_seconds(), server_meter.cpu_seconds())
        time.sleep(sizes.settle_seconds)

        rss = resident_bytes(agent.pid)
        agent_meter = ProcessMeter(agent.pid)
        server_meter = ProcessMeter(server.pid)
        with profiled(agent.pid, "agent-idle"):
            time.sleep(sizes.idle_seconds)
        idle = agent_meter.cores_busy()
        server_idle = server_meter.cores_busy()
    per_entry = (rss - empty_rss) / n
    return [
        Figure(NAME, f"agent VmRSS holding {n:,} entries + SVIDs", rss / MB, " MB",
               ceiling=f"{empty_rss / MB:.1f} MB with no entry; +{per_entry / 1024:.1f} KB/entry",
               target=f"< {TARGET_RSS / MB:.0f} MB", met=rss < TARGET_RSS),
        Figure(NAME, f"agent idle CPU holding {n:,} entries", idle * 100, "% of a core",
               ceiling=f"{empty_idle * 100:.2f}% with no entry",
               target=f"< {TARGET_IDLE * 100:.0f}%", met=idle < TARGET_IDLE),
        Figure(NAME, "server CPU while that agent idles", server_idle * 100, "% of a core"),
        Figure(NAME, f"admin API entry create, {sample} one by one, per server CPU-second",
               admin_rate, "/s", ceiling=f"{admin_wall_rate:,.1f}/s per wall second"),
        Figure(NAME, f"agent holds all {n:,} SVIDs after a bulk insert", held, " s",
               ceiling=f"agent CPU {held_cpu[0]:.2f} s, server CPU {held_cpu[1]:.2f} s "
               "meanwhile"),
    ]
