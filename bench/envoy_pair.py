"""Envoy as the mesh's data plane: requests per proxy CPU-second and the latency a pair adds
at 1 and 32 connections, for the Envoy pair Tessera configures beside a hand-written static
Envoy pair with the same features, and the haproxy, nginx and built-in pairs of
:mod:`bench.mtls_proxy`, in the same run.

    wrk --> backend                                                          (direct)
    wrk --> Envoy outbound --mTLS, HTTP/2--> Envoy inbound --> backend       (Tessera: ADS/SDS)
    wrk --> Envoy outbound --mTLS, HTTP/2--> Envoy inbound --> backend       (static config)
    wrk --> built-in outbound --mTLS, HTTP/1.1--> built-in inbound --> backend  (the agent's)
    wrk --> nginx | haproxy | tessera sidecar proxy pair --> backend         (bench.mtls_proxy)

wrk sends ``Host: users-service`` to every path but the built-in HTTP pair's, which gets
``Host: users-builtin`` (its inbound is that Service's instance, so that it and Tessera's
Envoy pair can be up at once). The backend is the nginx of
:func:`bench.mtls_proxy.nginx_backend`.

- **Tessera's Envoys** start from :func:`mesh.envoy.build_bootstrap` (one worker each,
  ``--concurrency 1``) and get everything else over ADS and SDS from a real agent: the
  client sidecar (Service ``bench-client``, SVID ``spiffe://bench.test/client``) routes
  ``users-service`` to the one instance registered through the agent
  (:class:`dataplane.registration.InstanceRegistration`), whose sidecar (SVID
  ``spiffe://bench.test/users``) lets only the client's SPIFFE ID in (an
  AuthorizationPolicy, rendered as RBAC) and forwards to the backend. The agent's
  render writes Envoy's JSON access log to stdout (the bench sends it to a file).
- **The static Envoy pair** is written by hand: the same SVIDs, fetched once from the
  same agent and written as files, the same SAN check of ``spiffe://bench.test/users``
  by the outbound, the same RBAC allowing only ``spiffe://bench.test/client`` on the
  inbound, the same JSON access log line per request to stdout on both sides, HTTP/2
  between the proxies over one mTLS connection.
- **The built-in HTTP pair** is two ``tessera sidecar run --proxy builtin`` processes
  started as users start them (HTTP/1.1 between them over kept-alive mTLS connections),
  against the same agent and the same mesh configuration as Tessera's Envoys: the
  ``bench-client`` sidecar's ``--outbound`` routes by Host to the ``users-builtin``
  instance (which its sidecar registers itself, with the same SVID and labels as
  ``users-service``'s), whose inbound lets only the client's SPIFFE ID in and forwards
  to the backend; each writes its JSON access log line per request to stdout (the bench
  sends it to a file). Its figures sit beside Tessera's Envoy pair's, as ratios: the
  built-in proxy's target in HTTP mode is at least the Envoy pair's requests per
  CPU-second, at a p99 within 1.5x of Envoy's. The two pairs are up at once and
  measured in turn, :data:`ROUNDS` times, each round in the other order; a pair's
  figures are those of its round of median rate, and the ratio of rates is the median
  of the rounds' own ratios.

With ``TESSERA_BENCH_ENVOY_DUMPS=DIR`` each Envoy's ``/config_dump`` is written to DIR,
to compare what the two pairs run. With ``TESSERA_BENCH_PROFILE=DIR`` (and ``py-spy``
installed) both built-in sidecars are sampled during the run at the most connections,
into DIR/builtin_http-outbound.txt and DIR/builtin_http-inbound.txt (collapsed stacks).

    python bench/run.py --only envoy_pair
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from bench.deployment import (
    TESSERA,
    TRUST_DOMAIN,
    Agent,
    entry_body,
    free_port,
    running_agent,
    running_server,
)
from bench.handshakes import write_certificates
from bench.machine import ProcessMeter, profiled
from bench.mtls_proxy import (
    ALIAS,
    FULL,
    QUICK,
    Sizes,
    haproxy_pair,
    missing_tools,
    nginx_backend,
    nginx_pair,
    sidecar_pair,
    wait_for_port,
)
from bench.report import Figure, Skipped
from bench.wrk import WrkLoad, run_wrk
from dataplane.envoy.binary import find_envoy
from dataplane.envoy.errors import EnvoyMissing
from dataplane.registration import InstanceRegistration
from mesh.envoy import build_bootstrap
from mesh.envoy.listeners import ACCESS_LOG_FIELDS
from sdk.address import HostPort
from sdk.sidecar.svid_files import write_svid_files
from sdk.sources import WorkloadApiX509Source

NAME = "envoy_pair"
SERVICE = "users-service"
BUILTIN_SERVICE = "users-builtin"
"""The Service the built-in HTTP pair's inbound registers as: one of its own, so that it
and Tessera's Envoy pair can run at once without either client routing to the other's
inbound."""
CLIENT_SERVICE = "bench-client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/users"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/client"
BUILTIN_ID = f"spiffe://{TRUST_DOMAIN}/sidecar"
PAIRS = ("tessera_envoy", "static_envoy", "haproxy", "nginx", "builtin", "builtin_http")
"""Every pair measured, Tessera's Envoys first; ``direct`` is measured too. ``builtin`` is
the TCP pair of ``tessera sidecar proxy``, ``builtin_http`` the HTTP pair of ``tessera
sidecar run --proxy builtin``."""
STOP_DEADLINE = 30.0
READY_DEADLINE = 60.0
ROUNDS: Final = {True: 1, False: 3}
"""Rounds (by ``quick``) in which Tessera's Envoy pair and the built-in HTTP pair are
measured in turn: this machine's speed drifts by up to 2x over minutes, so a ratio of
two measurements taken a minute apart says more about the minute than the pairs."""


@dataclass(frozen=True)
class EnvoyPair:
    """A running pair: the outbound's port, both pids (outbound first) and both admins."""

    port: int
    pids: list[int]
    admins: dict[str, str]

    def upstream_connections(self) -> tuple[int, int]:
        """(HTTP/1.1, HTTP/2) connections the outbound opened to the inbound so far."""
        text = httpx.get(f"{self.admins['outbound']}/stats", timeout=10).text
        counts = {"upstream_cx_http1_total": 0, "upstream_cx_http2_total": 0}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            cluster, _, stat = name.rpartition(".")
            if (
                cluster.startswith("cluster.")
                and "tessera_agent" not in cluster
                and not cluster.startswith("cluster.inbound|")
                and stat in counts
            ):
                counts[stat] += int(value)
        return counts["upstream_cx_http1_total"], counts["upstream_cx_http2_total"]


MESH = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: {SERVICE}}}
spec:
  spiffeIds: [{SERVER_ID}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: {BUILTIN_SERVICE}}}
spec:
  spiffeIds: [{SERVER_ID}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: {CLIENT_SERVICE}}}
spec:
  spiffeIds: [{CLIENT_ID}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: users-callers}}
spec:
  selector: {{matchLabels: {{app: users}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["{CLIENT_ID}"]}}
"""


def run(quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    if missing := missing_tools():
        raise Skipped(
            f"needs {', '.join(missing)} (Debian: apt-get install wrk nginx-light haproxy)"
        )
    try:
        envoy = find_envoy()
    except EnvoyMissing as err:
        raise Skipped(str(err)) from None
    loads: dict[str, dict[int, WrkLoad]] = {}
    agent_cpu: dict[int, float] = {}
    connections: dict[str, tuple[int, int]] = {}
    per_side: dict[tuple[str, int], list[float]] = {}
    warm_up = sizes.seconds > 1
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "host.lua"
        script.write_text(f'wrk.headers["Host"] = "{SERVICE}"\n')
        files = write_certificates(tmp / "certificates")
        backend = free_port()

        builtin_script = tmp / "builtin-host.lua"
        builtin_script.write_text(f'wrk.headers["Host"] = "{BUILTIN_SERVICE}"\n')
        rounds: dict[tuple[str, int], list[tuple[WrkLoad, list[float]]]] = {}

        def measure_at(
            name: str,
            port: int,
            pids: Sequence[int],
            c: int,
            control_plane: int | None = None,
            profile: bool = False,
        ) -> None:
            meter = ProcessMeter(control_plane) if control_plane else None
            sides = [ProcessMeter(pid) for pid in pids]
            with contextlib.ExitStack() as profiles:
                if profile:
                    for pid, side in zip(pids, ("outbound", "inbound"), strict=True):
                        profiles.enter_context(profiled(pid, f"{name}-{side}"))
                load = run_wrk(
                    f"http://127.0.0.1:{port}/",
                    connections=c,
                    seconds=sizes.seconds,
                    pids=pids,
                    script=builtin_script if name == "builtin_http" else script,
                    warm_up=warm_up,
                )
            if meter is not None:
                agent_cpu[c] = meter.cpu_seconds()
            # Each side's share of the pair's CPU (warm-up included), applied to the
            # measured run's: CPU microseconds per request, outbound then inbound.
            spent = [side.cpu_seconds() for side in sides]
            split = [load.cpu * part / max(sum(spent), 1e-9) / load.requests * 1e6
                     for part in spent] if len(spent) == 2 else []  # fmt: skip
            rounds.setdefault((name, c), []).append((load, split))

        def measure(name: str, port: int, pids: Sequence[int]) -> None:
            for c in sizes.connections:
                measure_at(name, port, pids, c)

        with nginx_backend(tmp / "backend", backend) as backend_pids:
            measure("direct", backend, backend_pids)
            with nginx_pair(tmp / "nginx", files, backend) as (port, pids):
                measure("nginx", port, pids)
            with haproxy_pair(tmp / "haproxy", files, backend) as (port, pids):
                measure("haproxy", port, pids)
            with mesh_deployment(tmp) as agent:
                svids = {
                    spiffe_id: svid_files(
                        agent.socket_path, spiffe_id, tmp / "svids" / spiffe_id.rsplit("/", 1)[1]
                    )
                    for spiffe_id in (SERVER_ID, CLIENT_ID)
                }
                with static_envoy_pair(envoy, tmp / "static", svids, backend) as pair:
                    measure("static_envoy", pair.port, pair.pids)
                    connections["static_envoy"] = pair.upstream_connections()
                with (
                    tessera_envoy_pair(envoy, tmp / "tessera", agent.socket_path, backend) as pair,
                    builtin_http_pair(tmp / "builtin_http", agent.socket_path, backend) as (
                        port,
                        pids,
                    ),
                ):
                    # Both up at once, measured in turn, each round in the other order.
                    in_turn = [
                        ("tessera_envoy", pair.port, pair.pids, agent.pid),
                        ("builtin_http", port, pids, None),
                    ]
                    total = ROUNDS[quick]
                    for n in range(total):
                        for c in sizes.connections:
                            for name, at, processes, control_plane in in_turn:
                                profile = (name == "builtin_http" and n == total - 1
                                           and c == sizes.connections[-1])  # fmt: skip
                                measure_at(name, at, processes, c, control_plane, profile)
                        in_turn.reverse()
                    connections["tessera_envoy"] = pair.upstream_connections()
                with sidecar_pair(tmp, agent.socket_path, backend) as (port, pids):
                    measure("builtin", port, pids)
    for (name, c), measured in rounds.items():
        # The round of the median rate stands for the pair (its p50 and p99 with it).
        load, split = sorted(measured, key=lambda item: item[0].per_cpu_second)[
            len(measured) // 2
        ]
        loads.setdefault(name, {})[c] = load
        if split:
            per_side[name, c] = split
    ratios = {
        c: [
            builtin.per_cpu_second / envoy.per_cpu_second
            for (envoy, _), (builtin, _) in zip(
                rounds["tessera_envoy", c], rounds["builtin_http", c], strict=True
            )
        ]
        for c in sizes.connections
    }
    return figures(loads, sizes, agent_cpu, connections, per_side, ratios)


@contextlib.contextmanager
def mesh_deployment(tmp: Path) -> Iterator[Agent]:
    """A server and an agent with :data:`MESH` applied and this uid's SVIDs (the TCP
    built-in pair's, the users-service's and the client's) issued."""
    with (
        running_server(tmp / "server") as server,
        running_agent(server, tmp / "agent", alias=ALIAS) as agent,
    ):
        subprocess.run(
            [TESSERA, "mesh", "apply", "-f", "-", "--data-dir", str(server.data_dir)],
            input=MESH.encode(),
            check=True,
            capture_output=True,
            timeout=60,
        )
        uid = [f"unix:uid:{os.getuid()}"]
        server.create_entries(
            [entry_body(spiffe_id, ALIAS, uid) for spiffe_id in (BUILTIN_ID, SERVER_ID, CLIENT_ID)]
        )
        agent.wait_for_svids(3, timeout=30)
        yield agent


def figures(
    loads: Mapping[str, Mapping[int, WrkLoad]],
    sizes: Sizes,
    agent_cpu: Mapping[int, float],
    connections: Mapping[str, tuple[int, int]],
    per_side: Mapping[tuple[str, int], Sequence[float]] | None = None,
    ratios: Mapping[int, Sequence[float]] | None = None,
) -> list[Figure]:
    """Per connection count: Tessera's Envoy pair's requests per proxy CPU-second and its
    added p50 and p99, each beside the other pairs' and as ratios to the static Envoy
    pair and the haproxy pair. ``connections``: per Envoy pair, the HTTP/1.1 and HTTP/2
    connections its outbound opened to its inbound over the whole run; ``per_side``: per
    (pair, connections), the CPU microseconds per request of its outbound and inbound
    processes (in the JSON only); ``ratios``: per connection count, the built-in HTTP
    pair's requests per CPU-second over Tessera's Envoy pair's in each round they were
    measured in turn (the figure is their median; none: the two loads' ratio)."""
    between = "; ".join(
        f"{name} {http1} HTTP/1.1, {http2} HTTP/2" for name, (http1, http2) in connections.items()
    )
    result = []
    for c in sizes.connections:
        per = f"{c} connection{'s' if c > 1 else ''}"
        data = {
            f"{name}_{key}": value
            for name, by_count in loads.items()
            for key, value in (
                ("requests", by_count[c].requests),
                ("cpu_seconds", by_count[c].cpu),
                ("per_cpu_second", by_count[c].per_cpu_second),
                ("p50_seconds", by_count[c].p50),
                ("p99_seconds", by_count[c].p99),
            )
        }
        data["agent_cpu_seconds"] = agent_cpu.get(c, 0.0)
        for (name, count), (outbound, inbound) in (per_side or {}).items():
            if count == c:
                data[f"{name}_outbound_cpu_us_per_request"] = outbound
                data[f"{name}_inbound_cpu_us_per_request"] = inbound
        for name, (http1, http2) in connections.items():
            data[f"{name}_upstream_http1_connections"] = http1
            data[f"{name}_upstream_http2_connections"] = http2
        rate = {name: loads[name][c].per_cpu_second for name in PAIRS}
        tessera, static = rate["tessera_envoy"], rate["static_envoy"]
        result.append(
            Figure(
                NAME,
                f"Envoy pair: requests per proxy CPU-second, {per}",
                tessera,
                "/s",
                ceiling="; ".join(
                    [
                        f"{static:,.0f}/s static Envoy ({tessera / static:.2f}x)",
                        f"{rate['haproxy']:,.0f}/s haproxy "
                        f"({tessera / rate['haproxy']:.2f}x; static Envoy "
                        f"{static / rate['haproxy']:.2f}x)",
                        f"{rate['nginx']:,.0f}/s nginx",
                        f"{rate['builtin']:,.0f}/s built-in",
                    ]
                ),
                target=">= 0.90x static Envoy",
                met=tessera >= 0.9 * static,
                data=data,
                note="both Envoy pairs: mTLS both ways, the inbound's SPIFFE ID checked by the "
                "outbound, RBAC allowing only the client's on the inbound, a JSON access "
                "log line per request on each side, HTTP/2 between (connections the "
                f"outbound opened over the run: {between}); the agent's CPU meanwhile: "
                f"{agent_cpu.get(c, 0.0):.2f}s (not counted)"
                if c == sizes.connections[0]
                else f"the agent's CPU meanwhile: {agent_cpu.get(c, 0.0):.2f}s (not counted)",
            )
        )
        for label in ("p50", "p99"):
            added = {
                name: (
                    float(getattr(loads[name][c], label))
                    - float(getattr(loads["direct"][c], label))
                )
                * 1000
                for name in PAIRS
            }
            result.append(
                Figure(
                    NAME,
                    f"Envoy pair: {label} added over direct, {per}",
                    added["tessera_envoy"],
                    " ms",
                    ceiling="; ".join(
                        [
                            f"{added['static_envoy']:.2f} ms static Envoy "
                            f"({_ratio(added['tessera_envoy'], added['static_envoy'])})",
                            f"{added['haproxy']:.2f} ms haproxy "
                            f"({_ratio(added['tessera_envoy'], added['haproxy'])})",
                            f"{added['nginx']:.2f} ms nginx",
                            f"{added['builtin']:.2f} ms built-in",
                        ]
                    ),
                )
            )
        result += builtin_http_figures(loads, c, per, (ratios or {}).get(c, ()))
    return result


def builtin_http_figures(
    loads: Mapping[str, Mapping[int, WrkLoad]], c: int, per: str, ratios: Sequence[float] = ()
) -> list[Figure]:
    """The built-in HTTP pair at ``c`` connections beside Tessera's Envoy pair: its
    requests per proxy CPU-second (target: at least the Envoy pair's; ``ratios``: the
    ratio in each round the two were measured in turn, of which the median counts) and
    its p99 (target: within 1.5x of the Envoy pair's)."""
    builtin, envoy, direct = loads["builtin_http"][c], loads["tessera_envoy"][c], loads["direct"][c]
    rate = (statistics.median(ratios) if ratios
            else builtin.per_cpu_second / envoy.per_cpu_second)  # fmt: skip
    in_rounds = (f"; median of {len(ratios)} rounds measured in turn with it: "
                 + ", ".join(f"{r:.2f}" for r in ratios)) if len(ratios) > 1 else ""  # fmt: skip
    p99 = builtin.p99 / envoy.p99
    # Added over direct, when both pairs' p99 are above direct's (a noisy direct run's
    # can be higher).
    added = _ratio(builtin.p99 - direct.p99, envoy.p99 - direct.p99, builtin.p99 > direct.p99)
    data = {"builtin_http_per_cpu_second_ratio": rate, "builtin_http_p99_ratio": p99}
    data.update({f"builtin_http_round_{n}_ratio": r for n, r in enumerate(ratios, 1)})
    return [
        Figure(
            NAME,
            f"built-in HTTP pair: requests per proxy CPU-second, {per}",
            builtin.per_cpu_second,
            "/s",
            ceiling=f"{envoy.per_cpu_second:,.0f}/s Tessera's Envoy pair ({rate:.2f}x{in_rounds})",
            target=">= 1.00x Tessera's Envoy pair",
            met=rate >= 1.0,
            data=data,
            note="two `tessera sidecar run --proxy builtin`: routing by Host, mTLS, the "
            "mesh's AuthorizationPolicy on the inbound, a JSON access log line per request "
            f"on each side; {builtin.per_wall_second:,.0f} requests/s wall "
            f"(Envoy pair {envoy.per_wall_second:,.0f}/s)",
        ),
        Figure(
            NAME,
            f"built-in HTTP pair: p99, {per}",
            builtin.p99 * 1000,
            " ms",
            ceiling=f"{envoy.p99 * 1000:.2f} ms Tessera's Envoy pair ({p99:.2f}x; "
            f"added over direct {added})",
            target="<= 1.5x Tessera's Envoy pair",
            met=p99 <= 1.5,
            data=data,
        ),
    ]


def _ratio(value: float, other: float, meaningful: bool = True) -> str:
    return f"{value / other:.2f}x" if other > 0 and meaningful else "-"


# -- the SVIDs as files ----------------------------------------------------------------------


def svid_files(socket_path: Path, spiffe_id: str, directory: Path) -> dict[str, Path]:
    """``spiffe_id``'s SVID, key and bundle from the agent, written once into ``directory``
    (as ``tessera sidecar files`` writes them)."""
    source = WorkloadApiX509Source(str(socket_path), spiffe_id=spiffe_id, timeout=30)
    try:
        write_svid_files(directory, source.snapshot())
    finally:
        source.close()
    return {
        "svid.pem": directory / "svid.pem",
        "svid.key": directory / "svid.key",
        "bundle.pem": directory / "bundle.pem",
    }


# -- Envoy processes -------------------------------------------------------------------------


@contextlib.contextmanager
def envoy_process(
    envoy: Path, prefix: Path, name: str, bootstrap: dict[str, Any], listen_port: int
) -> Iterator[tuple[int, str]]:
    """``envoy`` with one worker thread and ``bootstrap``, until something listens on
    ``listen_port``; yields its pid and its admin's URL. Its stdout (the access log)
    and stderr go to ``prefix/name.log``."""
    prefix.mkdir(parents=True, exist_ok=True)
    config = prefix / f"{name}.json"
    config.write_text(json.dumps(bootstrap, indent=2))
    log = prefix / f"{name}.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            [
                str(envoy),
                "-c",
                str(config),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    admin = bootstrap["admin"]["address"]["socket_address"]
    try:
        wait_for_port(listen_port, process, log)
        yield process.pid, f"http://{admin['address']}:{admin['port_value']}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_for_answer(
    port: int,
    logs: Sequence[Path],
    processes: Sequence[subprocess.Popen[bytes]] = (),
    host: str = SERVICE,
) -> None:
    """Poll ``GET / (Host: host)`` through a pair until it answers 200 (failing at once when
    one of ``processes`` has exited)."""
    deadline = time.monotonic() + READY_DEADLINE
    last = "no answer"
    while time.monotonic() < deadline:
        exited = next((process for process in processes if process.poll() is not None), None)
        if exited is not None:
            last = f"a sidecar (pid {exited.pid}) exited with status {exited.returncode}"
            break
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/", headers={"host": host}, timeout=5)
        except httpx.HTTPError as err:
            last = type(err).__name__
        else:
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        time.sleep(0.1)
    tails = "\n".join(
        f"{log}:\n{log.read_text(errors='replace')[-1500:]}" for log in logs if log.exists()
    )
    raise RuntimeError(f"the pair did not answer 200 ({last}):\n{tails}")


def save_config_dumps(name: str, admins: Mapping[str, str]) -> None:
    """Each Envoy's ``/config_dump`` (with EDS) into $TESSERA_BENCH_ENVOY_DUMPS, if set."""
    directory = os.environ.get("TESSERA_BENCH_ENVOY_DUMPS")
    if not directory:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    for side, url in admins.items():
        dump = httpx.get(f"{url}/config_dump?include_eds", timeout=10).text
        (Path(directory) / f"{name}-{side}.json").write_text(dump)


# -- Tessera's Envoy pair --------------------------------------------------------------------


@contextlib.contextmanager
def tessera_envoy_pair(
    envoy: Path, prefix: Path, socket_path: Path, backend: int
) -> Iterator[EnvoyPair]:
    """Two Envoys from :func:`mesh.envoy.build_bootstrap`, configured by the agent: the
    ``users-service`` instance (registered through the agent) in front of ``backend``,
    and a ``bench-client`` sidecar whose outbound listener routes to it."""
    inbound, client_inbound, outbound = free_port(), free_port(), free_port()
    labels = {"app": "users"}
    server_side = build_bootstrap(
        node_id="sidecar~users~1",
        node_cluster=SERVICE,
        agent_socket=str(socket_path),
        admin_port=free_port(),
        metadata={
            "tessera.proxy": "sidecar",
            "tessera.service": SERVICE,
            "tessera.labels": json.dumps(labels),
            "tessera.spiffe_id": SERVER_ID,
            "tessera.inbound": f"127.0.0.1:{inbound}",
            "tessera.app": f"127.0.0.1:{backend}",
            # The agent (so far) renders only sidecars with an outbound listener; this
            # one is never called.
            "tessera.outbound": f"127.0.0.1:{free_port()}",
        },
    )
    client_side = build_bootstrap(
        node_id="sidecar~client~1",
        node_cluster=CLIENT_SERVICE,
        agent_socket=str(socket_path),
        admin_port=free_port(),
        metadata={
            "tessera.proxy": "sidecar",
            "tessera.service": CLIENT_SERVICE,
            "tessera.labels": json.dumps({"app": "client"}),
            "tessera.spiffe_id": CLIENT_ID,
            "tessera.inbound": f"127.0.0.1:{client_inbound}",
            "tessera.app": f"127.0.0.1:{backend}",
            "tessera.outbound": f"127.0.0.1:{outbound}",
        },
    )
    registration = InstanceRegistration(
        socket=str(socket_path),
        service=SERVICE,
        spiffe_id=SERVER_ID,
        address=HostPort("127.0.0.1", inbound),
        check_address=HostPort("127.0.0.1", backend),
        labels=labels,
    )
    with (
        _registered(registration),
        envoy_process(envoy, prefix, "inbound", server_side, inbound) as (
            inbound_pid,
            inbound_admin,
        ),
        envoy_process(envoy, prefix, "outbound", client_side, outbound) as (
            outbound_pid,
            outbound_admin,
        ),
    ):
        wait_for_answer(outbound, [prefix / "inbound.log", prefix / "outbound.log"])
        admins = {"inbound": inbound_admin, "outbound": outbound_admin}
        save_config_dumps("tessera", admins)
        yield EnvoyPair(outbound, [outbound_pid, inbound_pid], admins)


@contextlib.contextmanager
def _registered(registration: InstanceRegistration) -> Iterator[None]:
    """``registration`` kept open on a thread of its own while the block runs."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(registration.run())

    def follow() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        # What grpc's channel left behind ends too, before the loop closes.
        left = asyncio.all_tasks(loop)
        for pending in left:
            pending.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))

    thread = threading.Thread(target=follow, name="bench-registration", daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout=10)
        loop.close()


# -- the built-in HTTP pair -------------------------------------------------------------------


@contextlib.contextmanager
def builtin_http_pair(
    prefix: Path, socket_path: Path, backend: int
) -> Iterator[tuple[int, list[int]]]:
    """``tessera sidecar run --proxy builtin`` twice, as users start them: the
    ``users-service`` instance's sidecar in front of ``backend`` (it registers itself
    through the agent, labelled ``app=users`` for the AuthorizationPolicy), and a
    ``bench-client`` sidecar whose ``--outbound`` routes to it by Host. Yields the
    outbound's port and both pids (outbound first), once a request through the pair is
    answered 200. Each one's stdout (the access log) goes to ``prefix/NAME.access.log``,
    its stderr to ``prefix/NAME.log``."""
    prefix.mkdir(parents=True, exist_ok=True)
    outbound = free_port()
    sides = {
        "inbound": [
            "--service", BUILTIN_SERVICE, "--spiffe-id", SERVER_ID, "--label", "app=users",
            "--inbound", f"127.0.0.1:{free_port()}", "--app", f"127.0.0.1:{backend}",
        ],
        "outbound": [
            "--service", CLIENT_SERVICE, "--spiffe-id", CLIENT_ID, "--label", "app=client",
            "--inbound", f"127.0.0.1:{free_port()}", "--app", f"127.0.0.1:{backend}",
            "--outbound", f"127.0.0.1:{outbound}",
        ],
    }  # fmt: skip
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for side, args in sides.items():
            with (
                (prefix / f"{side}.access.log").open("ab") as access_log,
                (prefix / f"{side}.log").open("ab") as log,
            ):
                processes[side] = subprocess.Popen(
                    [
                        TESSERA, "sidecar", "run", "--proxy", "builtin", *args,
                        "--socket", str(socket_path), "--health-bind", f"127.0.0.1:{free_port()}",
                        "--log-level", "warning",
                    ],
                    stdout=access_log,
                    stderr=log,
                )  # fmt: skip
        wait_for_port(outbound, processes["outbound"], prefix / "outbound.log")
        wait_for_answer(outbound, [prefix / "inbound.log", prefix / "outbound.log"],
                        list(processes.values()), host=BUILTIN_SERVICE)  # fmt: skip
        yield outbound, [processes["outbound"].pid, processes["inbound"].pid]
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- the hand-written static Envoy pair ------------------------------------------------------


@contextlib.contextmanager
def static_envoy_pair(
    envoy: Path, prefix: Path, svids: Mapping[str, Mapping[str, Path]], backend: int
) -> Iterator[EnvoyPair]:
    """Two Envoys from hand-written static configs, with the SVID files ``svids`` (by
    SPIFFE ID), in front of ``backend``."""
    inbound, outbound = free_port(), free_port()
    server_side = _static_bootstrap(
        [_static_inbound(inbound, svids[SERVER_ID])], [_plain_cluster("backend", backend)]
    )
    client_side = _static_bootstrap(
        [_static_outbound(outbound)], [_mtls_cluster("users", inbound, svids[CLIENT_ID])]
    )
    with (
        envoy_process(envoy, prefix, "inbound", server_side, inbound) as (
            inbound_pid,
            inbound_admin,
        ),
        envoy_process(envoy, prefix, "outbound", client_side, outbound) as (
            outbound_pid,
            outbound_admin,
        ),
    ):
        # Static listeners and clusters: listening, each is whole.
        admins = {"inbound": inbound_admin, "outbound": outbound_admin}
        save_config_dumps("static", admins)
        yield EnvoyPair(outbound, [outbound_pid, inbound_pid], admins)


def _typed(message: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{message}", **fields}


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _static_bootstrap(
    listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "node": {"id": "static", "cluster": "static"},
        "admin": {"address": _address(free_port())},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _connection_manager(
    name: str, filters: list[dict[str, Any]], cluster: str, domains: list[str], **settings: Any
) -> dict[str, Any]:
    access_log = {
        "name": "envoy.access_loggers.file",
        "typed_config": _typed(
            "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            path="/dev/stdout",
            log_format={
                # The fields of Tessera's access log line, so both pairs write the same.
                "json_format": {"listener": name, **ACCESS_LOG_FIELDS},
                "formatters": [
                    {
                        "name": "envoy.formatter.req_without_query",
                        "typed_config": _typed(
                            "envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"
                        ),
                    }
                ],
            },
        ),
    }
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
    }
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": _typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=name,
            route_config={
                "name": name,
                "virtual_hosts": [
                    {
                        "name": name,
                        "domains": domains,
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                    }
                ],
            },
            http_filters=[*filters, router],
            access_log=[access_log],
            **settings,
        ),
    }


def _tls_certificate(files: Mapping[str, Path]) -> dict[str, Any]:
    return {
        "certificate_chain": {"filename": str(files["svid.pem"])},
        "private_key": {"filename": str(files["svid.key"])},
    }


def _static_inbound(port: int, files: Mapping[str, Path]) -> dict[str, Any]:
    """mTLS requiring a client certificate of the bundle; RBAC lets only the client's
    SPIFFE ID through; then the backend."""
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": _typed(
            "envoy.extensions.filters.http.rbac.v3.RBAC",
            rules={
                "action": "ALLOW",
                "policies": {
                    "client": {
                        "permissions": [{"any": True}],
                        "principals": [{"authenticated": {"principal_name": {"exact": CLIENT_ID}}}],
                    }
                },
            },
        ),
    }
    tls = _typed(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=True,
        common_tls_context={
            "tls_certificates": [_tls_certificate(files)],
            "validation_context": {"trusted_ca": {"filename": str(files["bundle.pem"])}},
            "alpn_protocols": ["h2", "http/1.1"],
        },
    )
    return {
        "name": "inbound",
        "address": _address(port),
        "filter_chains": [
            {
                "filters": [_connection_manager("inbound", [rbac], "backend", ["*"])],
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
            }
        ],
    }


def _static_outbound(port: int) -> dict[str, Any]:
    """Plain HTTP on loopback: ``users-service`` goes to the inbound."""
    return {
        "name": "outbound",
        "address": _address(port),
        "filter_chains": [
            {"filters": [_connection_manager("outbound", [], "users", [SERVICE, f"{SERVICE}:80"])]}
        ],
    }


def _plain_cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}],
        },
    }


def _mtls_cluster(name: str, port: int, files: Mapping[str, Path]) -> dict[str, Any]:
    """HTTP/2 over mTLS to the inbound, whose certificate must carry ``SERVER_ID``."""
    http = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    tls = _typed(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        common_tls_context={
            "tls_certificates": [_tls_certificate(files)],
            "validation_context": {
                "trusted_ca": {"filename": str(files["bundle.pem"])},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": SERVER_ID}}
                ],
            },
            "alpn_protocols": ["h2"],
        },
    )
    return {
        **_plain_cluster(name, port),
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
        "typed_extension_protocol_options": {
            http: _typed(http, explicit_http_config={"http2_protocol_options": {}})
        },
    }
