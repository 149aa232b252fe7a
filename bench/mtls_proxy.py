"""mTLS data path: requests/s per core and added latency through an outbound + inbound
``tessera sidecar proxy`` pair, against a direct connection and against nginx proxying the
same mTLS, in the same run.

    wrk --> backend                                              (direct)
    wrk --> sidecar outbound --mTLS--> sidecar inbound --> backend   (Tessera)
    wrk --> nginx outbound   --mTLS--> nginx inbound   --> backend   (nginx)

The backend is nginx answering a small static response. The load generator
is ``wrk`` (Debian's package: ``apt-get install wrk``), keep-alive
connections, one thread. The sidecars run as two processes with SVIDs from a
real agent (``protocol = "tcp"`` listeners: each client connection is one
mTLS tunnel); the nginx pair has one worker each, presents SVIDs made for the
bench and checks the client's chain (nginx cannot check a SPIFFE ID, so it
authorizes any SVID of the bundle). Requests per core divides the rate by
the CPU the two proxies spent per wall second.

    python bench/run.py --only mtls_proxy
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
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
from bench.machine import ProcessMeter, profiled
from bench.report import Figure, Skipped

NAME = "mtls_proxy"
ALIAS = f"spiffe://{TRUST_DOMAIN}/node/sidecar"


@dataclass(frozen=True)
class Sizes:
    seconds: int
    connections: int


FULL = Sizes(seconds=6, connections=16)
QUICK = Sizes(seconds=1, connections=4)


@dataclass(frozen=True)
class Load:
    rate: float
    p50: float
    p99: float
    proxy_cores: float
    """CPU seconds per wall second the proxies spent (0 for the direct path)."""

    @property
    def per_core(self) -> float:
        return self.rate / self.proxy_cores if self.proxy_cores else 0.0


def run(quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    if shutil.which("wrk") is None or shutil.which("nginx") is None:
        raise Skipped("needs wrk and nginx (Debian: apt-get install wrk nginx-light)")
    if subprocess.run([TESSERA, "sidecar", "proxy", "--help"], capture_output=True,
                      check=False).returncode != 0:
        raise Skipped("tessera sidecar proxy not available")
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp_name:
        tmp = Path(tmp_name)
        files = write_certificates(tmp)
        backend_port = free_port()
        with _nginx(tmp / "backend", _backend_conf(backend_port)) as _:
            direct = _wrk(backend_port, sizes, [])
            with _nginx_pair(tmp, files, backend_port) as (port, pids):
                nginx = _wrk(port, sizes, pids)
            with running_server(tmp / "server") as server, \
                    running_agent(server, tmp / "agent", alias=ALIAS) as agent:
                server.create_entries([entry_body(f"spiffe://{TRUST_DOMAIN}/sidecar", ALIAS,
                                                  [f"unix:uid:{os.getuid()}"])])
                agent.wait_for_svids(1, timeout=30)
                with _sidecar_pair(tmp, agent.socket_path, backend_port) as (port, pids), \
                        profiled(pids[1], "sidecar-inbound"):
                    tessera = _wrk(port, sizes, pids)
    added = f"direct p50 {direct.p50 * 1000:.2f} ms"
    return [
        Figure(NAME, "requests/s through the proxy pair", tessera.rate, "/s",
               ceiling=f"{nginx.rate:,.0f}/s nginx pair; {direct.rate:,.0f}/s direct"),
        Figure(NAME, "requests/s per proxy core", tessera.per_core, "/s",
               ceiling=f"{nginx.per_core:,.0f}/s nginx pair"),
        Figure(NAME, "added latency p50 (pair minus direct)", (tessera.p50 - direct.p50) * 1000,
               " ms", ceiling=f"{(nginx.p50 - direct.p50) * 1000:.2f} ms nginx pair; {added}"),
        Figure(NAME, "latency p99 through the pair", tessera.p99 * 1000, " ms",
               ceiling=f"{nginx.p99 * 1000:.2f} ms nginx pair; {direct.p99 * 1000:.2f} ms direct"),
    ]


# -- load ------------------------------------------------------------------------------------


def _wrk(port: int, sizes: Sizes, pids: list[int]) -> Load:
    url = f"http://127.0.0.1:{port}/"
    if sizes.seconds > 1:  # warm up
        subprocess.run(["wrk", "-t1", "-c2", "-d1s", url], capture_output=True, check=True)
    meters = [ProcessMeter(pid) for pid in pids]
    result = subprocess.run(
        ["wrk", "-t1", f"-c{sizes.connections}", f"-d{sizes.seconds}s", "--latency", url],
        capture_output=True, text=True, check=True, timeout=sizes.seconds + 60,
    )
    cores = sum(m.cores_busy() for m in meters)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", result.stdout)
    if rate is None or errors is not None:
        raise RuntimeError(f"wrk through port {port} failed:\n{result.stdout}")
    return Load(rate=float(rate.group(1)), p50=_wrk_latency(result.stdout, "50%"),
                p99=_wrk_latency(result.stdout, "99%"), proxy_cores=cores)


def _wrk_latency(output: str, percentile: str) -> float:
    match = re.search(rf"^\s+{percentile}\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {percentile} latency in wrk's output:\n{output}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[match.group(2)]
    return float(match.group(1)) * scale


# -- the Tessera sidecar pair ----------------------------------------------------------------


@contextlib.contextmanager
def _sidecar_pair(tmp: Path, socket_path: Path, backend_port: int
                  ) -> Iterator[tuple[int, list[int]]]:
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
                 str(socket_path), "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT)
            processes.append(process)
            _wait_for_port(port, process, tmp / f"{config.stem}.log")
        yield outbound_port, [processes[1].pid, processes[0].pid]
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


# -- nginx -----------------------------------------------------------------------------------


def _backend_conf(port: int) -> str:
    return f"""
        server {{
            listen 127.0.0.1:{port};
            keepalive_requests 100000;
            location / {{ default_type text/plain; return 200 "ok from the backend\\n"; }}
        }}"""


def _nginx_pair_conf(files: dict[str, Path], backend: int, inbound: int, outbound: int) -> str:
    return f"""
        upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
        upstream inbound {{ server 127.0.0.1:{inbound}; keepalive 64; }}
        server {{
            listen 127.0.0.1:{inbound} ssl;
            ssl_certificate {files["server.pem"]};
            ssl_certificate_key {files["server.key"]};
            ssl_client_certificate {files["bundle.pem"]};
            ssl_verify_client on;
            keepalive_requests 100000;
            location / {{
                proxy_pass http://backend;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}
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
                proxy_ssl_session_reuse on;
            }}
        }}"""


@contextlib.contextmanager
def _nginx_pair(tmp: Path, files: dict[str, Path], backend_port: int
                ) -> Iterator[tuple[int, list[int]]]:
    """Two nginx processes (one worker each): the outbound and the inbound proxy."""
    inbound, outbound = free_port(), free_port()
    config = _nginx_pair_conf(files, backend_port, inbound, outbound)
    with _nginx(tmp / "nginx-pair", config) as pids:
        yield outbound, pids


@contextlib.contextmanager
def _nginx(prefix: Path, servers: str) -> Iterator[list[int]]:
    """nginx with one worker serving ``servers``; yields the worker's pid."""
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
        port = int(re.findall(r"listen 127\.0\.0\.1:(\d+)", servers)[-1])
        _wait_for_port(port, process, prefix / "error.log")
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                 text=True, check=False).stdout.split()
        yield [int(pid) for pid in workers]
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"nothing listens on port {port}:\n{text[-2000:]}")
        time.sleep(0.05)
