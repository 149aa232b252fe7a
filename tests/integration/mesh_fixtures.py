"""Apps, Envoy sidecars and gateways for the mesh's scenario tests, started as users start
them (``tessera sidecar run --proxy envoy``, ``tessera gateway run``).

    with trust_domain(tmp_path, entries) as domain, processes() as begin:
        start = ProxyStarter(domain, begin, tmp_path)
        users = App.serving("users-1")                       # a small real HTTP app
        sidecar = start.sidecar("users-1", "users-service", USERS, users, "app=users")
        sidecar.wait_ready()
        healthy(domain, sidecar.address)                     # in tessera mesh services
        gateway = start.gateway("gateway", GATEWAY, offset=free_port() - 80)

An :class:`App` answers every request with JSON naming the app, the path, the caller's
SPIFFE ID as its sidecar wrote it and the ``traceparent`` it was sent; a test changes its
behaviour between requests with :attr:`App.behaviour` (fail every other request, answer
slowly, a status) and reads what it served from :attr:`App.served`.

The scenario suite runs each case against each data plane: mark a case
:func:`supported_by` the planes that do it, take ``plane`` as an argument, and start its
sidecars with ``plane=plane``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import TESSERA, free_port, tessera
from tests.integration.sidecar_fixtures import TrustDomain
from tests.support.processes import Process, poll

DEADLINE = 20.0
Test = TypeVar("Test", bound=Callable[..., Any])
PLANES = ("envoy", "builtin")
"""The data planes the scenario suite runs each case against (``--proxy``)."""


def supported_by(*planes: str, case: str = "") -> Callable[[Test], Test]:
    """Run a scenario against every plane (its ``plane`` argument), the ones not in
    ``planes`` expected to fail (strictly: a pass there fails), and say so in the docs'
    table of what each plane does (docs/dataplanes.md, checked against these marks), on
    a row reading ``case`` (else the test's name in words)::

        @supported_by("envoy", case="a 90/10 split")
        def test_a_split(plane: str, ...) -> None: ...
    """
    parametrize = pytest.mark.parametrize("plane", [
        name if name in planes else pytest.param(name, marks=pytest.mark.xfail(
            strict=True, reason=f"the {name} data plane does not do this yet"))
        for name in PLANES
    ])  # fmt: skip

    def mark(test: Test) -> Test:
        words = test.__name__.removeprefix("test_").replace("_", " ")
        setattr(test, SCENARIO, ScenarioCase(case or words, frozenset(planes)))
        return parametrize(test)

    return mark


@dataclass(frozen=True)
class ScenarioCase:
    """A case of the scenario suite, and the planes that do it."""

    case: str
    planes: frozenset[str]


SCENARIO = "tessera_scenario"
"""The attribute :func:`supported_by` sets on a scenario test: its :class:`ScenarioCase`."""


@dataclass
class Behaviour:
    """What an app answers: ``fail_every`` N: every Nth request gets ``failure_status``;
    ``delay``: seconds to wait before answering (a slow app, for timeouts)."""

    fail_every: int = 0
    failure_status: int = 503
    delay: float = 0.0


class App(ThreadingHTTPServer):
    """An app on loopback: answers with its name, the path, and who its sidecar said called."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), AppHandler)
        self.name = name
        self.behaviour = Behaviour()
        self.served = 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()

    @classmethod
    def serving(cls, name: str) -> App:
        app = cls(name)
        threading.Thread(target=app.serve_forever, args=(0.05,), daemon=True).start()
        return app

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def count(self) -> int:
        """This request's number (1 for the first), counted by the app."""
        with self._lock:
            self.served += 1
            return self.served

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._lock:
            self._connections.add(request)
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def kill(self) -> None:
        """Stop as a crashed app does: the listener closes and every open connection is
        cut (a kept-alive one included), so its sidecar's next request is refused."""
        self.stop()
        with self._lock:
            cut = list(self._connections)
        for connection in cut:
            with contextlib.suppress(OSError):  # already closed by the other side
                connection.shutdown(socket.SHUT_RDWR)


class AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    # An answer is written whole, in one send when the request is done: ``App.kill`` cuts a
    # connection before an answer or after it, never between its head and its body.
    wbufsize = 1 << 16
    server: App

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # cut by ``App.kill``, as a crash would
            super().handle()

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200, {"app": self.server.name, "healthy": True})
            return
        behaviour = self.server.behaviour
        number = self.server.count()
        if behaviour.delay:
            time.sleep(behaviour.delay)  # the app under test is slow on purpose
        failing = behaviour.fail_every and number % behaviour.fail_every == 0
        self._answer(behaviour.failure_status if failing else 200, {
            "app": self.server.name, "path": self.path, "number": number,
            "caller": self.headers.get_all("X-Forwarded-Client-Spiffe-Id"),
            "traceparent": self.headers.get("traceparent"),
        })  # fmt: skip

    do_POST = do_DELETE = do_PUT = do_GET

    def _answer(self, status: int, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@dataclass
class Proxy:
    """A running ``tessera sidecar run --proxy envoy`` or ``tessera gateway run``."""

    process: Process
    health: int
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """A sidecar's inbound address, as the catalog has it."""
        return f"127.0.0.1:{self.ports['inbound']}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.health}{path}", timeout=5)

    def metrics(self) -> dict[str, float]:
        """Every sample of its /metrics, by name (the first of each name)."""
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                found.setdefault(sample.name, float(sample.value))
        return found

    def access_log(self, listener: str) -> list[dict[str, Any]]:
        """The JSON access log lines of ``listener`` in an Envoy proxy's log (``tessera.envoy``)
        or on a built-in proxy's stdout."""
        lines = []
        for line in (self.process.log() + "\n" + self.process.stdout()).splitlines():
            start = line.find('{"')
            if start < 0:
                continue
            try:
                document = json.loads(line[start:])
            except ValueError:
                continue
            if isinstance(document, dict) and document.get("listener") == listener:
                lines.append(document)
        return lines

    def wait_ready(self) -> None:
        self.process.wait_until(lambda: self.get("/ready").status_code == 200 or None,
                                "answering /ready with 200", DEADLINE)  # fmt: skip


@dataclass
class ProxyStarter:
    """Starts sidecars and gateways in ``directory`` with ``begin`` (``processes()``)."""

    domain: TrustDomain
    begin: Callable[..., Process]
    directory: Path

    def sidecar(self, name: str, service: str, spiffe_id: str, app: App, *labels: str,
                outbound: bool = False, extra: tuple[str, ...] = (),
                plane: str = "envoy") -> Proxy:  # fmt: skip
        args = ["--proxy", plane, "--service", service, "--spiffe-id", spiffe_id, *extra]
        for label in labels:
            args += ["--label", label]
        return self.sidecar_with(name, args, app, outbound=outbound)

    def sidecar_with(self, name: str, args: list[str], app: App, *,
                     outbound: bool = False) -> Proxy:  # fmt: skip
        """``tessera sidecar run ARGS`` (the docs' own, say) in front of ``app``, its
        ``--inbound``, ``--outbound`` (when ``outbound``) and health on free ports."""
        ports = {"inbound": free_port(), "health": free_port()}
        given = {"--app": app.address, "--inbound": f"127.0.0.1:{ports['inbound']}",
                 "--health-bind": f"127.0.0.1:{ports['health']}"}  # fmt: skip
        if outbound or "--outbound" in args:
            ports["outbound"] = free_port()
            given["--outbound"] = f"127.0.0.1:{ports['outbound']}"
        args = list(args)
        for flag, value in given.items():
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        command = [TESSERA, "sidecar", "run", *args]
        process = self.begin(name, command, directory=self.directory, env=self.domain.env())
        return Proxy(process, ports["health"], ports)

    def gateway(self, name: str, spiffe_id: str | None, *, offset: int,
                labels: tuple[str, ...] = ("istio=ingressgateway",),
                args: list[str] | None = None, plane: str | None = None) -> Proxy:  # fmt: skip
        """``tessera gateway run`` with ``args`` (the docs' own, say), or with these
        labels, SPIFFE ID and port offset; its health endpoints on a free port; with
        ``plane``, ``--proxy PLANE`` (else the command's default, Envoy)."""
        health = free_port()
        args = [TESSERA, "gateway", "run", *(args or ["--port-offset", str(offset)]),
                "--health-bind", f"127.0.0.1:{health}"]  # fmt: skip
        if plane is not None:
            args += ["--proxy", plane]
        if spiffe_id is not None:
            args += ["--spiffe-id", spiffe_id]
        for label in labels:
            args += ["--label", label]
        process = self.begin(name, args, directory=self.directory, env=self.domain.env())
        return Proxy(process, health, {"http": 80 + offset})


def mesh(domain: TrustDomain, *args: str, stdin: str | None = None) -> str:
    """``tessera mesh ARGS`` against the domain's server; its stdout."""
    return tessera("mesh", *args, "--data-dir", str(domain.server.data_dir), input=stdin).stdout


def instances(domain: TrustDomain) -> list[dict[str, Any]]:
    """What ``tessera mesh services --output json`` lists, from the admin API (polled often:
    a CLI run per call costs half a second)."""
    found: list[dict[str, Any]] = domain.admin().get("/v1/mesh/services")["instances"]
    return found


def healthy(domain: TrustDomain, address: str) -> None:
    """Wait until ``address`` is a healthy instance in ``tessera mesh services``."""
    poll(lambda: any(i["address"] == address and i["health"] == "healthy"
                     for i in instances(domain)) or None,
         DEADLINE, f"{address} healthy in tessera mesh services")  # fmt: skip
