"""``tessera sidecar proxy --workers``: the count, the restart delays, port 0, SO_REUSEPORT
listeners, and the supervisor's merge of the workers' metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from sdk.address import HostPort
from sdk.sidecar.cli import sidecar
from sdk.sidecar.config import ProxyConfig, parse_proxy_config
from sdk.sidecar.errors import SidecarConfigError
from sdk.sidecar.health import HealthServer
from sdk.sidecar.metrics import ProxyMetrics
from sdk.sidecar.proxy import Proxy
from sdk.sidecar.workers import (
    MAX_WORKERS,
    QUICK_DEATHS_ALLOWED,
    RESTART_DELAY_MAX_SECONDS,
    Supervisor,
    check_fixed_ports,
    parse_workers,
    restart_delay,
)
from sdk.sources import StaticX509Source
from tests.unit.sdk.conftest import LoopThread


def test_workers_is_a_count_or_auto() -> None:
    assert parse_workers("1") == 1
    assert parse_workers(" 4 ") == 4
    assert parse_workers(str(MAX_WORKERS)) == MAX_WORKERS
    assert parse_workers("auto") == parse_workers("AUTO") == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["0", "-1", "two", "", "1.5", str(MAX_WORKERS + 1)])
def test_anything_else_is_refused_with_a_sentence(value: str) -> None:
    with pytest.raises(SidecarConfigError) as raised:
        parse_workers(value)
    assert "neither a number from 1 to" in raised.value.message


def test_the_command_line_refuses_a_bad_count_without_a_traceback(tmp_path: Any) -> None:
    result = CliRunner().invoke(sidecar, ["proxy", "--config", str(tmp_path / "p.toml"),
                                          "--workers", "many"])  # fmt: skip
    assert result.exit_code == 2
    assert "'many' is neither a number from 1 to" in result.output
    assert "Traceback" not in result.output


def test_the_workers_option_is_documented_and_the_worker_one_hidden() -> None:
    result = CliRunner().invoke(sidecar, ["proxy", "--help"])
    assert "--workers N|AUTO" in result.output
    assert "--worker " not in result.output.replace("--workers", "")


def test_restarts_wait_longer_after_each_quick_death_up_to_a_cap() -> None:
    delays = [restart_delay(n) for n in range(8)]
    assert delays[0] == delays[1] == 0.5
    assert delays[2] == 1.0 and delays[3] == 2.0
    assert delays == sorted(delays) and delays[-1] == RESTART_DELAY_MAX_SECONDS


def _config(inbound: int, outbound: int) -> ProxyConfig:
    return parse_proxy_config({
        "health_bind": "0",
        "inbound": [{"name": "in", "listen": f"127.0.0.1:{inbound}", "forward": "127.0.0.1:9",
                     "policy": {"allow": [{"trust_domains": ["example.org"]}]}}],
        "outbound": [{"name": "out", "listen": f"127.0.0.1:{outbound}",
                      "upstream": "127.0.0.1:9", "trust_domain": "example.org"}],
    }, source="proxy.toml")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_listener_on_port_zero_is_refused_with_workers() -> None:
    config = _config(_free_port(), _free_port())
    check_fixed_ports(config)
    zero = dataclasses.replace(config.inbound[0], listen=HostPort("127.0.0.1", 0))
    with pytest.raises(SidecarConfigError) as raised:
        check_fixed_ports(dataclasses.replace(config, inbound=(zero,)))
    assert raised.value.message.startswith("in: listen = '127.0.0.1:0' asks for any free port")


def test_proxies_with_reuse_port_share_every_listener_and_others_cannot(
    loop_thread: LoopThread, api_source: StaticX509Source
) -> None:
    config = _config(_free_port(), _free_port())
    first, second = (Proxy(config, api_source, reuse_port=True) for _ in range(2))
    plain = Proxy(config, api_source)
    loop_thread.run(first.start())
    try:
        loop_thread.run(second.start())
        assert second.bound("in") == first.bound("in")
        assert second.bound("out") == first.bound("out")
        with pytest.raises(SidecarConfigError) as raised:
            loop_thread.run(plain.start())
        assert "in: cannot listen on" in raised.value.message
        assert "Address already in use" in raised.value.message
    finally:
        loop_thread.run(first.stop(grace=0))
        loop_thread.run(second.stop(grace=0))


def test_a_proxy_without_reuse_port_keeps_its_address_to_itself(
    loop_thread: LoopThread, api_source: StaticX509Source
) -> None:
    config = _config(_free_port(), _free_port())
    plain, sharing = Proxy(config, api_source), Proxy(config, api_source, reuse_port=True)
    loop_thread.run(plain.start())
    try:
        with pytest.raises(SidecarConfigError):
            loop_thread.run(sharing.start())
    finally:
        loop_thread.run(plain.stop(grace=0))


def test_the_supervisor_serves_every_workers_metrics_labelled_by_worker(
    loop_thread: LoopThread,
) -> None:
    servers = []
    for opened in (3, 5):
        metrics = ProxyMetrics()
        metrics.register_listener("in")
        metrics.connections.labels("in").inc(opened)
        metrics.handshake_seconds.labels("in").observe(0.002)
        server = HealthServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: None)
        loop_thread.run(server.start())
        servers.append(server)
    try:
        supervisor = Supervisor(["true"], 2, health=None, ready_timeout=1)
        for worker, server in zip(supervisor._workers, servers, strict=True):
            worker.ready, worker.health_port = True, server.bound.port

        async def scrape() -> bytes:
            return await supervisor.worker_metrics()

        text = loop_thread.run(scrape()).decode()
    finally:
        for server in servers:
            loop_thread.run(server.stop())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    connections = {s.labels["worker"]: s.value
                   for s in families["tessera_sidecar_connections"].samples
                   if s.name.endswith("_total")}  # fmt: skip
    assert connections == {"0": 3.0, "1": 5.0}
    counts = [s for s in families["tessera_sidecar_handshake_seconds"].samples
              if s.name.endswith("_count")]  # fmt: skip
    assert sorted(s.labels["worker"] for s in counts) == ["0", "1"]
    assert text.count("# TYPE tessera_sidecar_connections_total ") == 1  # one family, merged


def test_the_supervisor_is_not_ready_until_every_worker_is() -> None:
    supervisor = Supervisor(["true"], 2, health=None, ready_timeout=1)
    assert supervisor.ready_problem() == "worker 0 is starting"
    for worker in supervisor._workers:
        worker.ready, worker.problem = True, None
    assert supervisor.ready_problem() is None
    supervisor._workers[1].problem = '{"status": "not ready", "reason": "no SVID"}'
    assert "worker 1" in (supervisor.ready_problem() or "")


def test_a_worker_that_exits_before_it_is_ready_stops_the_supervisor() -> None:
    events: list[str] = []
    supervisor = Supervisor(["sh", "-c", "exit 3", "--"], 2, health=None, ready_timeout=10,
                            on_event=events.append)  # fmt: skip
    status = asyncio.run(supervisor.run(asyncio.Event()))
    assert status == 1
    assert any("exited with status 3 before it was ready" in line for line in events)



def test_workers_that_keep_dying_are_restarted_then_given_up_on() -> None:
    events: list[str] = []
    delays: list[int] = []

    def no_wait(quick_deaths: int) -> float:
        delays.append(quick_deaths)
        return 0.0

    # Each worker says it is ready, then exits at once: a quick death every time.
    supervisor = Supervisor(["sh", "-c", "echo ready -; exit 7", "--"], 1, health=None,
                            ready_timeout=10, on_event=events.append,
                            delay=no_wait)  # fmt: skip

    async def run() -> int:
        return await asyncio.wait_for(supervisor.run(asyncio.Event()), 30)

    assert asyncio.run(run()) == 1
    assert delays == list(range(1, QUICK_DEATHS_ALLOWED + 1))
    assert sum("exited with status 7; starting it again" in e for e in events) == len(delays)
    assert "giving up and stopping the others" in events[-1]
    assert supervisor.metrics.restarts._value.get() == QUICK_DEATHS_ALLOWED
