"""`tessera sidecar proxy --workers 2` as users run it: a real server and agent, one proxy
command whose two workers each bind an outbound and an inbound listener (SO_REUSEPORT), a
plain HTTP app behind them.

    httpx --> outbound (worker 0 or 1) --mTLS--> inbound (worker 0 or 1) --> app
"""

from __future__ import annotations

import os
import re
import signal
import socket
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import free_port
from tests.integration.sidecar_fixtures import (
    Entry,
    TrustDomain,
    processes,
    tessera_args,
    trust_domain,
)
from tests.support.processes import poll

pytestmark = pytest.mark.integration

WEB = "spiffe://example.org/web"
READY = re.compile(r"Sidecar proxy is ready: 2 workers, pids (\d+), (\d+)\.")


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    with trust_domain(tmp_path_factory.mktemp("workers"), [Entry(WEB)]) as running:
        yield running


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def app_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _config(directory: Path, app_port: int, *, inbound: int, outbound: int,
            health: int) -> Path:  # fmt: skip
    path = directory / "proxy.toml"
    path.write_text(textwrap.dedent(f"""
        health_bind = "127.0.0.1:{health}"
        [[inbound]]
        name = "in"
        listen = "127.0.0.1:{inbound}"
        forward = "127.0.0.1:{app_port}"
        [inbound.policy]
        [[inbound.policy.allow]]
        ids = ["{WEB}"]
        [[outbound]]
        name = "out"
        listen = "127.0.0.1:{outbound}"
        upstream = "127.0.0.1:{inbound}"
        spiffe_id = "{WEB}"
    """))
    return path


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _connections_by_worker(health: int) -> dict[tuple[str, str], float]:
    text = httpx.get(f"http://127.0.0.1:{health}/metrics", timeout=5).text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "tessera_sidecar_connections":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["worker"], sample.labels["listener"]] = sample.value
    return counts


def _get_on_new_connections(port: int, count: int) -> None:
    for _ in range(count):
        with httpx.Client(timeout=10) as client:
            answer = client.get(f"http://127.0.0.1:{port}/", headers={"Connection": "close"})
        assert answer.status_code == 200 and answer.text == "hello\n"


def test_two_workers_share_the_listeners_restart_and_stop_together(
    domain: TrustDomain, app_port: int, tmp_path: Path
) -> None:
    inbound, outbound, health = free_port(), free_port(), free_port()
    config = _config(tmp_path, app_port, inbound=inbound, outbound=outbound, health=health)
    with processes() as start:
        proxy = start("proxy", tessera_args("sidecar", "proxy", "--config", str(config),
                                            "--workers", "2"),
                      directory=tmp_path, env=domain.env())  # fmt: skip
        match = proxy.wait_until(lambda: READY.search(proxy.log()), "ready with 2 workers")
        pids = [int(match.group(1)), int(match.group(2))]
        assert all(_parent(pid) == proxy.pid for pid in pids)
        for index, pid in enumerate(pids):
            assert f"Worker {index} (pid {pid}) presenting {WEB}" in proxy.log()

        # Fresh connections are spread over both workers, on both listeners.
        _get_on_new_connections(outbound, 40)
        counts = _connections_by_worker(health)
        for worker in ("0", "1"):
            assert counts.get((worker, "out"), 0) > 0, counts
            assert counts.get((worker, "in"), 0) > 0, counts
        assert sum(counts.values()) == 80, counts  # 40 out, 40 in, none counted twice
        assert httpx.get(f"http://127.0.0.1:{health}/ready", timeout=5).status_code == 200

        # SIGHUP reaches every worker (this policy is inline: each says it cannot reload it).
        proxy.send_signal(signal.SIGHUP)
        proxy.wait_until(lambda: proxy.log().count("in: the policy is inline") == 2 or None,
                         "both workers answering SIGHUP")  # fmt: skip

        # A killed worker is started again, and serves.
        os.kill(pids[0], signal.SIGKILL)
        restarted = proxy.wait_until(
            lambda: re.search(r"Worker 0 started again \(pid (\d+)\)", proxy.log()),
            "worker 0 started again")  # fmt: skip
        new_pid = int(restarted.group(1))
        assert new_pid not in pids and _parent(new_pid) == proxy.pid
        assert f"Worker 0 (pid {pids[0]}) was killed by signal 9; starting it again" \
            in proxy.log()  # fmt: skip
        poll(lambda: httpx.get(f"http://127.0.0.1:{health}/ready", timeout=5).status_code
             == 200 or None, 20, "ready again")  # fmt: skip
        _get_on_new_connections(outbound, 20)
        assert _connections_by_worker(health).get(("0", "out"), 0) > 0
        assert "tessera_sidecar_worker_restarts_total 1.0" in httpx.get(
            f"http://127.0.0.1:{health}/metrics", timeout=5).text  # fmt: skip

        # SIGTERM stops the supervisor and every worker.
        assert proxy.stop(signal.SIGTERM) == 0
        poll(lambda: not any(_alive(pid) for pid in (new_pid, pids[1])) or None, 20,
             "every worker gone")  # fmt: skip
        assert "Sidecar stopped." in proxy.log()


def test_workers_fail_clearly_on_a_port_another_process_holds(
    domain: TrustDomain, app_port: int, tmp_path: Path
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        config = _config(tmp_path, app_port, inbound=taken.getsockname()[1],
                         outbound=free_port(), health=free_port())  # fmt: skip
        with processes() as start:
            proxy = start("proxy", tessera_args("sidecar", "proxy", "--config", str(config),
                                                "--workers", "2"),
                          directory=tmp_path, env=domain.env())  # fmt: skip
            assert proxy.wait(timeout=60) == 1
        log = proxy.log()
        assert "in: cannot listen on" in log and "Address already in use" in log, log
        assert "before it was ready" in log and "Traceback" not in log
    finally:
        taken.close()


def test_workers_stop_when_their_supervisor_is_killed(
    domain: TrustDomain, app_port: int, tmp_path: Path
) -> None:
    config = _config(tmp_path, app_port, inbound=free_port(), outbound=free_port(),
                     health=free_port())  # fmt: skip
    with processes() as start:
        proxy = start("proxy", tessera_args("sidecar", "proxy", "--config", str(config),
                                            "--workers", "2"),
                      directory=tmp_path, env=domain.env())  # fmt: skip
        match = proxy.wait_until(lambda: READY.search(proxy.log()), "ready with 2 workers")
        pids = [int(match.group(1)), int(match.group(2))]
        proxy.send_signal(signal.SIGKILL)
        proxy.wait(timeout=10)
        poll(lambda: not any(_alive(pid) for pid in pids) or None, 20, "every worker gone")
