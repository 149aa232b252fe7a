"""mTLS data path: requests per proxy CPU-second and latency at 1 and 32 connections through
an outbound + inbound ``tessera sidecar proxy`` pair, beside an nginx pair, a haproxy pair and
a direct connection, in the same run.

    wrk --> backend                                                  (direct)
    wrk --> sidecar outbound --mTLS--> sidecar inbound --> backend   (Tessera, TCP)
    wrk --> nginx outbound   --mTLS--> nginx inbound   --> backend   (nginx, HTTP proxy)
    wrk --> haproxy outbound --mTLS--> haproxy inbound --> backend   (haproxy, TCP)

The backend is nginx answering a small static response. The load generator is
``wrk`` (Debian's package), keep-alive connections, one thread, at 1 and at 32
connections. Every pair is two processes, one per side:

- the sidecars: SVIDs from a real agent, ``protocol = "tcp"`` listeners (each
  client connection is one mTLS tunnel); each side accepts any SPIFFE ID of the
  trust domain;
- nginx (one worker each, HTTP proxying with keep-alive upstreams): the inbound
  requires a client certificate of the bundle (``ssl_verify_client on``); the
  outbound verifies the inbound's chain against the bundle and its DNS SAN
  ``server.bench.test`` (``proxy_ssl_verify on``, ``proxy_ssl_name``). nginx
  cannot check a URI SAN, so neither side checks a SPIFFE ID;
- haproxy (``nbthread 1``, ``mode tcp``): the inbound requires a client
  certificate of the bundle (``verify required ca-file``) and refuses any
  whose DER lacks the URI SAN ``spiffe://bench.test/client``
  (``tcp-request session reject unless { ssl_c_der,hex -m sub ... }``, the
  GeneralName's tag and length included, so only that exact URI matches); the
  outbound verifies the inbound's chain and its DNS SAN (``verify required
  verifyhost server.bench.test``; haproxy checks no URI SAN of a server).

Each side also runs with two workers, one per core of a 2-CPU machine, beside
haproxy with as many threads: the Tessera pair as two ``tessera sidecar proxy
--workers 2`` (four worker processes, SO_REUSEPORT), the haproxy pair with
``nbthread 2``. There the figure is the total rate (requests per wall second,
all cores), with the rate per proxy CPU-second beside it.

Requests per proxy CPU-second divides the requests wrk completed by the CPU
seconds (user + system, all threads, /proc/<pid>/stat) both proxy processes
spent during the run.

Each Tessera pair and its haproxy peer are up at once (with the Tessera server and
agent running for both) and measured in turn, :data:`ROUNDS` times, each round in the
other order; a pair's figures are those of its round of median rate, and the targets
(at least 0.80x the haproxy pair's requests per proxy CPU-second; with workers, at least
its total rate) are judged on the median of the rounds' own ratios.

    python bench/run.py --only mtls_proxy
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.deployment import (
    TESSERA,
    TRUST_DOMAIN,
    entry_body,
    free_port,
    running_agent,
    running_server,
)
from bench.handshakes import write_certificates
from bench.machine import profiled
from bench.report import Figure, Skipped
from bench.wrk import WrkLoad, run_wrk

NAME = "mtls_proxy"
ALIAS = f"spiffe://{TRUST_DOMAIN}/node/sidecar"
TOOLS = ("wrk", "nginx", "haproxy")
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/client"
SERVER_NAME = f"server.{TRUST_DOMAIN}"


@dataclass(frozen=True)
class Sizes:
    seconds: int
    connections: tuple[int, ...]


FULL = Sizes(seconds=6, connections=(1, 32))
QUICK = Sizes(seconds=1, connections=(1, 32))

PEERS = ("nginx", "haproxy")
WORKERS = 2
"""Workers (Tessera) and threads (haproxy) per side in the all-cores comparison."""
ROUNDS = {True: 1, False: 3}
"""Rounds (by ``quick``) in which each Tessera pair and its haproxy peer, both up, are
measured in turn: this machine's speed drifts over minutes, so two pairs measured a minute
apart compare the minutes as much as the pairs."""


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def run(quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    if missing := missing_tools():
        raise Skipped(f"needs {', '.join(missing)} (Debian: apt-get install wrk nginx-light "
                      "haproxy)")
    if subprocess.run([TESSERA, "sidecar", "proxy", "--help"], capture_output=True,
                      check=False).returncode != 0:
        raise Skipped("tessera sidecar proxy not available")
    rounds: dict[tuple[str, int], list[WrkLoad]] = {}
    warm_up = sizes.seconds > 1
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp_name:
        tmp = Path(tmp_name)
        files = write_certificates(tmp / "certificates")
        backend_port = free_port()

        def measure_at(name: str, port: int, pids: Sequence[int], c: int) -> None:
            with contextlib.ExitStack() as profiles:
                if name == "tessera" and c == sizes.connections[-1] and (
                    len(rounds.get((name, c), ())) == ROUNDS[quick] - 1
                ):  # the last round at the most connections: the inbound sidecar sampled
                    profiles.enter_context(profiled(pids[1], "sidecar-inbound"))
                rounds.setdefault((name, c), []).append(
                    run_wrk(f"http://127.0.0.1:{port}/", connections=c, seconds=sizes.seconds,
                            pids=pids, warm_up=warm_up))  # fmt: skip

        def measure(name: str, port: int, pids: Sequence[int]) -> None:
            for c in sizes.connections:
                measure_at(name, port, pids, c)

        def in_turn(pairs: list[tuple[str, int, list[int]]]) -> None:
            """Pairs that are up at once, measured in turn, each round in the other order."""
            for _ in range(ROUNDS[quick]):
                for c in sizes.connections:
                    for name, port, pids in pairs:
                        measure_at(name, port, pids, c)
                pairs.reverse()

        with nginx_backend(tmp / "backend", backend_port) as backend_pids:
            measure("direct", backend_port, backend_pids)
            with nginx_pair(tmp / "nginx", files, backend_port) as (port, pids):
                measure("nginx", port, pids)
            with running_server(tmp / "server") as server, \
                    running_agent(server, tmp / "agent", alias=ALIAS) as agent:
                server.create_entries([entry_body(f"spiffe://{TRUST_DOMAIN}/sidecar", ALIAS,
                                                  [f"unix:uid:{os.getuid()}"])])
                agent.wait_for_svids(1, timeout=30)
                with haproxy_pair(tmp / "haproxy", files, backend_port) as haproxy, \
                        sidecar_pair(tmp, agent.socket_path, backend_port) as (port, pids):
                    in_turn([("haproxy", *haproxy), ("tessera", port, pids)])
                with haproxy_pair(tmp / "haproxy-threads", files, backend_port,
                                  threads=WORKERS) as threads, \
                        sidecar_pair(tmp / "workers", agent.socket_path, backend_port,
                                     workers=WORKERS) as (port, pids):
                    in_turn([("haproxy_threads", *threads), ("tessera_workers", port, pids)])
    loads: dict[str, dict[int, WrkLoad]] = {}
    for (name, c), measured in rounds.items():  # the round of the median rate stands for it
        median = sorted(measured, key=lambda load: load.per_cpu_second)[len(measured) // 2]
        loads.setdefault(name, {})[c] = median
    ratios = {
        (pair, c): [
            ours.per_cpu_second / theirs.per_cpu_second if pair == "tessera"
            else ours.per_wall_second / theirs.per_wall_second
            for ours, theirs in zip(rounds[pair, c], rounds[peer, c], strict=True)
        ]
        for pair, peer in (("tessera", "haproxy"), ("tessera_workers", "haproxy_threads"))
        for c in sizes.connections
    }  # fmt: skip
    return _figures(loads, sizes, ratios)


def _figures(
    loads: dict[str, dict[int, WrkLoad]],
    sizes: Sizes,
    ratios: Mapping[tuple[str, int], Sequence[float]] | None = None,
) -> list[Figure]:
    """``ratios``: per (``tessera`` or ``tessera_workers``, connections), the pair's rate
    over its haproxy peer's in each round they were measured in turn (per proxy
    CPU-second; with workers, per wall second): the targets are judged on their median."""
    figures = []
    for c in sizes.connections:
        tessera = loads["tessera"][c]
        per = f"{c} connection{'s' if c > 1 else ''}"
        share = _median_ratio((ratios or {}).get(("tessera", c), ()),
                              tessera.per_cpu_second / loads["haproxy"][c].per_cpu_second)
        workers_share = _median_ratio(
            (ratios or {}).get(("tessera_workers", c), ()),
            loads["tessera_workers"][c].per_wall_second
            / loads["haproxy_threads"][c].per_wall_second)  # fmt: skip
        data = {f"{name}_{key}": value for name, by_count in loads.items()
                for key, value in (("requests", by_count[c].requests),
                                   ("per_wall_second", by_count[c].per_wall_second),
                                   ("cpu_seconds", by_count[c].cpu),
                                   ("per_cpu_second", by_count[c].per_cpu_second),
                                   ("p50_seconds", by_count[c].p50),
                                   ("p99_seconds", by_count[c].p99))}
        figures.append(Figure(
            NAME, f"requests per proxy CPU-second, {per}", tessera.per_cpu_second, "/s",
            ceiling="; ".join(f"{loads[peer][c].per_cpu_second:,.0f}/s {peer} pair"
                              for peer in PEERS) + f" (haproxy {share.text})",
            target=">= 0.80x haproxy pair", met=share.value >= 0.8,
            data=data,
            note="nginx (HTTP proxy) checks both chains and the inbound's DNS SAN but no "
                 "SPIFFE ID (it cannot read a URI SAN); haproxy (TCP) checks both chains, the "
                 "inbound's DNS SAN and the client's SPIFFE ID; the sidecars (TCP) check both "
                 "chains and the trust domain" if c == sizes.connections[0] else ""))
        for label in ("p50", "p99"):
            ms = {name: float(getattr(by_count[c], label)) * 1000
                  for name, by_count in loads.items()}
            figures.append(Figure(
                NAME, f"latency {label} through the pair, {per}", ms["tessera"], " ms",
                ceiling="; ".join([*(f"{ms[peer]:.2f} ms {peer} pair" for peer in PEERS),
                                   f"{ms['direct']:.2f} ms direct"])))
        workers, threads = loads["tessera_workers"][c], loads["haproxy_threads"][c]
        figures.append(Figure(
            NAME, f"requests per second, all cores, {WORKERS} workers a side, {per}",
            workers.per_wall_second, "/s",
            ceiling=f"{threads.per_wall_second:,.0f}/s haproxy pair (nbthread {WORKERS}; "
                    f"{workers_share.text}); per proxy CPU-second "
                    f"{workers.per_cpu_second:,.0f}/s against {threads.per_cpu_second:,.0f}/s",
            target=">= haproxy's", met=workers_share.value >= 1.0))
        figures.append(Figure(
            NAME, f"latency p99, {WORKERS} workers a side, {per}", workers.p99 * 1000, " ms",
            ceiling=f"{threads.p99 * 1000:.2f} ms haproxy pair (nbthread {WORKERS})"))
    return figures


@dataclass(frozen=True)
class _Share:
    value: float
    text: str


def _median_ratio(rounds: Sequence[float], single: float) -> _Share:
    """The median of the rounds' ratios (``single``, the two loads' own, without rounds),
    and how to print it."""
    if len(rounds) < 2:
        value = rounds[0] if rounds else single
        return _Share(value, f"{value:.2f}x")
    value = statistics.median(rounds)
    each = ", ".join(f"{r:.2f}" for r in rounds)
    return _Share(value, f"{value:.2f}x, the median of {len(rounds)} rounds in turn: {each}")


# -- the Tessera sidecar pair ----------------------------------------------------------------


@contextlib.contextmanager
def sidecar_pair(tmp: Path, socket_path: Path, backend_port: int, workers: int = 1
                 ) -> Iterator[tuple[int, list[int]]]:
    """Two ``tessera sidecar proxy`` processes with the agent's SVIDs (TCP, each accepting
    any SPIFFE ID of the trust domain) in front of ``backend_port``, each with ``workers``
    workers; yields the outbound's port and the pids to meter (the outbound's first; with
    workers, each supervisor's and its workers')."""
    tmp.mkdir(parents=True, exist_ok=True)
    inbound_port, outbound_port = free_port(), free_port()
    inbound = tmp / "inbound.toml"
    inbound.write_text(
        'health_bind = "0"\n\n[[inbound]]\n'
        f'listen = "127.0.0.1:{inbound_port}"\nforward = "127.0.0.1:{backend_port}"\n'
        f'[inbound.policy]\n[[inbound.policy.allow]]\ntrust_domains = ["{TRUST_DOMAIN}"]\n')
    outbound = tmp / "outbound.toml"
    outbound.write_text(
        'health_bind = "0"\n\n[[outbound]]\n'
        f'listen = "127.0.0.1:{outbound_port}"\nupstream = "127.0.0.1:{inbound_port}"\n'
        f'trust_domain = "{TRUST_DOMAIN}"\n')
    processes = []
    try:
        for config, port in ((inbound, inbound_port), (outbound, outbound_port)):
            log = (tmp / f"{config.stem}.log").open("ab")
            process = subprocess.Popen(
                [TESSERA, "sidecar", "proxy", "--config", str(config), "--socket",
                 str(socket_path), "--log-level", "warning", "--workers", str(workers)],
                stdout=log, stderr=subprocess.STDOUT)
            processes.append(process)
            wait_for_port(port, process, tmp / f"{config.stem}.log")
            if workers > 1:
                wait_for_text("Sidecar proxy is ready", process, tmp / f"{config.stem}.log")
        pids = []
        for process in (processes[1], processes[0]):
            pids.append(process.pid)
            if workers > 1:
                pids += [int(pid) for pid in subprocess.run(
                    ["pgrep", "-P", str(process.pid)], capture_output=True, text=True,
                    check=False).stdout.split()]  # fmt: skip
        yield outbound_port, pids
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


# -- nginx -----------------------------------------------------------------------------------


@contextlib.contextmanager
def nginx_backend(prefix: Path, port: int) -> Iterator[list[int]]:
    """The backend every path ends at: nginx answering a small static response."""
    with _nginx(prefix, port, f"""
        server {{
            listen 127.0.0.1:{port};
            keepalive_requests 100000;
            location / {{ default_type text/plain; return 200 "ok from the backend\\n"; }}
        }}""") as pids:
        yield pids


@contextlib.contextmanager
def nginx_pair(prefix: Path, files: dict[str, Path], backend: int
               ) -> Iterator[tuple[int, list[int]]]:
    """Two nginx processes (one worker each): the outbound and the inbound proxy. Yields the
    outbound's port and both workers' pids. The outbound presents ``client.pem`` and
    verifies the inbound's chain and DNS name; the inbound presents ``server.pem`` and
    requires a client certificate of ``bundle.pem``."""
    inbound, outbound = free_port(), free_port()
    inbound_conf = f"""
        upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
        server {{
            listen 127.0.0.1:{inbound} ssl;
            ssl_certificate {files["server.pem"]};
            ssl_certificate_key {files["server.key"]};
            ssl_client_certificate {files["bundle.pem"]};
            ssl_verify_client on;
            ssl_verify_depth 2;
            keepalive_requests 100000;
            location / {{
                proxy_pass http://backend;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}"""
    outbound_conf = f"""
        upstream inbound {{ server 127.0.0.1:{inbound}; keepalive 64; }}
        server {{
            listen 127.0.0.1:{outbound};
            keepalive_requests 100000;
            location / {{
                proxy_pass https://inbound;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_ssl_certificate {files["client.pem"]};
                proxy_ssl_certificate_key {files["client.key"]};
                proxy_ssl_trusted_certificate {files["bundle.pem"]};
                proxy_ssl_verify on;
                proxy_ssl_verify_depth 2;
                proxy_ssl_name {SERVER_NAME};
                proxy_ssl_server_name on;
                proxy_ssl_session_reuse on;
            }}
        }}"""
    with _nginx(prefix / "inbound", inbound, inbound_conf) as inbound_pids, \
            _nginx(prefix / "outbound", outbound, outbound_conf) as outbound_pids:
        yield outbound, outbound_pids + inbound_pids


@contextlib.contextmanager
def _nginx(prefix: Path, port: int, servers: str) -> Iterator[list[int]]:
    """nginx with one worker serving ``servers`` (listening on ``port``); yields the
    worker's pid."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(f"""
        worker_processes 1;
        daemon off;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log warn;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            client_body_temp_path {prefix}; proxy_temp_path {prefix};
            fastcgi_temp_path {prefix}; uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
            {servers}
        }}
    """)
    process = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, process, prefix / "error.log")
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                 text=True, check=False).stdout.split()
        yield [int(pid) for pid in workers]
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- haproxy ---------------------------------------------------------------------------------


def der_uri_pattern(uri: str) -> str:
    """The hex of a URI GeneralName as DER encodes it in a SAN (tag [6], length, bytes), as
    haproxy's ``hex`` converter spells it: a substring test with it matches that exact URI."""
    raw = uri.encode()
    if len(raw) > 127:
        raise ValueError("a URI this long needs a long-form DER length")
    return (bytes([0x86, len(raw)]) + raw).hex().upper()


@contextlib.contextmanager
def haproxy_pair(prefix: Path, files: dict[str, Path], backend: int,
                 client_id: str = CLIENT_ID, threads: int = 1
                 ) -> Iterator[tuple[int, list[int]]]:
    """Two haproxy processes (``threads`` threads each, TCP mode): the outbound and the
    inbound proxy.
    Yields the outbound's port and both pids. The outbound presents ``client.pem`` and
    verifies the inbound's chain and DNS name; the inbound presents ``server.pem``, requires
    a client certificate of ``bundle.pem`` and refuses any SPIFFE ID but ``client_id``."""
    prefix.mkdir(parents=True, exist_ok=True)
    inbound, outbound = free_port(), free_port()
    for name in ("server", "client"):  # haproxy wants the certificate and its key in one file
        (prefix / f"{name}-with-key.pem").write_bytes(
            files[f"{name}.pem"].read_bytes() + files[f"{name}.key"].read_bytes())
    common = f"""
        global
            nbthread {threads}
            maxconn 4096
        defaults
            mode tcp
            timeout connect 5s
            timeout client 60s
            timeout server 60s
    """
    inbound_conf = common + f"""
        frontend inbound
            bind 127.0.0.1:{inbound} ssl crt {prefix / "server-with-key.pem"} ca-file {files["bundle.pem"]} verify required
            tcp-request session reject unless {{ ssl_c_der,hex -m sub {der_uri_pattern(client_id)} }}
            default_backend app
        backend app
            server app 127.0.0.1:{backend}
    """  # noqa: E501
    outbound_conf = common + f"""
        frontend outbound
            bind 127.0.0.1:{outbound}
            default_backend inbound
        backend inbound
            server inbound 127.0.0.1:{inbound} ssl crt {prefix / "client-with-key.pem"} ca-file {files["bundle.pem"]} verify required verifyhost {SERVER_NAME} sni str({SERVER_NAME})
    """  # noqa: E501
    with _haproxy(prefix / "inbound", inbound, inbound_conf) as inbound_pid, \
            _haproxy(prefix / "outbound", outbound, outbound_conf) as outbound_pid:
        yield outbound, [outbound_pid, inbound_pid]


@contextlib.contextmanager
def _haproxy(prefix: Path, port: int, config: str) -> Iterator[int]:
    """haproxy in the foreground (one process) with ``config``; yields its pid."""
    prefix.mkdir(parents=True, exist_ok=True)
    config_path = prefix / "haproxy.cfg"
    config_path.write_text(textwrap.dedent(config))
    log = prefix / "haproxy.log"
    with log.open("ab") as output:
        process = subprocess.Popen(["haproxy", "-db", "-f", str(config_path)],
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, log)
        yield process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_for_text(text: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``text`` is in ``log``; RuntimeError if the process exits or 60 s pass first."""
    deadline = time.monotonic() + 60
    while text not in (written := log.read_text(errors="replace") if log.exists() else ""):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {text!r} in {log}:\n{written[-2000:]}")
        time.sleep(0.05)


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"nothing listens on port {port}:\n{text[-2000:]}")
        time.sleep(0.05)
