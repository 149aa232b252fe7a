"""Mesh changes as traffic sees them: from a ``VirtualService`` apply, and from an instance's
health check failing, to the first request a real Envoy routes by the new state.

A real server and agent, and three ``tessera sidecar run --proxy envoy`` as users start
them: two instances of ``users`` (apps answering their name; labels ``version=a`` and
``version=b``) and a caller, ``web``, whose Envoy's outbound this process calls on one
kept-alive connection (so one Envoy worker, whose ROUND_ROBIN alternates the instances).

*Route change*: a VirtualService sends every request to subset ``a``, then ``b``, then
``a``... Each apply (``POST /v1/mesh/apply``, the admin API ``tessera mesh apply`` calls)
is timed from the call to the first answer from the new subset, this process sending
requests back to back meanwhile (each a millisecond or two through two Envoys). The
reference is the admin call alone.

*Unhealthy instance*: no VirtualService (every request to both instances); the Service's
HTTP health check runs every 100 ms, and the agent marks an instance unhealthy after two
failed checks in a row. Instance ``a``'s app starts failing its ``/healthz``; the time
runs from the first check it fails to the first request ``b`` answers right after another
``b`` (while both serve, ROUND_ROBIN alternates them, so that request is the first one
routed by the new state), when four in a row follow. Then ``a`` recovers and both serve
again before the next round. The reference is the time between the two failed checks
(the agent's rule, not propagation).

    python bench/run.py --only mesh_traffic
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bench.deployment import (
    TESSERA,
    TRUST_DOMAIN,
    Agent,
    Server,
    entry_body,
    free_port,
    running_agent,
    running_server,
)
from bench.machine import percentile
from bench.report import Figure, Skipped
from dataplane.envoy.binary import find_envoy
from dataplane.envoy.errors import EnvoyMissing

NAME = "mesh_traffic"
ALIAS = f"spiffe://{TRUST_DOMAIN}/node/mesh-traffic"
USERS = f"spiffe://{TRUST_DOMAIN}/users"
WEB = f"spiffe://{TRUST_DOMAIN}/web"
TARGET_P99 = 1.0
RUN = 4
"""Answers in a row from ``b`` that say ``a`` is out (ROUND_ROBIN alternates otherwise)."""
SECOND = 2
"""The answer of the run routed by the new state for sure: the first may be alternation's."""
DEADLINE = 30.0

MESH = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users}}
spec:
  spiffeIds: [{USERS}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  healthCheck: {{http: {{path: /healthz}}, interval: 100ms, timeout: 100ms}}
---
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: web}}
spec:
  spiffeIds: [{WEB}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: users}}
spec:
  host: users
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
  subsets:
  - {{name: a, labels: {{version: a}}}}
  - {{name: b, labels: {{version: b}}}}
"""

ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: users}}
spec:
  hosts: [users]
  http:
  - route:
    - destination: {{host: users, subset: {subset}}}
"""


@dataclass(frozen=True)
class Sizes:
    rounds: int


FULL = Sizes(rounds=20)
QUICK = Sizes(rounds=2)


def run(quick: bool = False) -> list[Figure]:
    try:
        find_envoy()
    except EnvoyMissing as missing:
        raise Skipped(str(missing)) from None
    sizes = QUICK if quick else FULL
    with (
        tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp,
        mesh(Path(tmp)) as (server, outbound, apps),
    ):
        routed, admin_calls = route_changes(server, outbound, sizes.rounds)
        avoided, decided = unhealthy_instances(server, outbound, apps["a"], sizes.rounds)
    rule = f"{percentile(decided, 0.5) * 1000:.0f} ms between the two failed checks"
    return [
        Figure(
            NAME,
            "VirtualService apply -> first request routed by it: p50",
            percentile(routed, 0.5) * 1000,
            " ms",
            ceiling=f"{percentile(admin_calls, 0.5) * 1000:.1f} ms the admin call alone",
        ),
        Figure(
            NAME,
            "VirtualService apply -> first request routed by it: p99",
            percentile(routed, 0.99) * 1000,
            " ms",
            ceiling=f"{percentile(admin_calls, 0.99) * 1000:.1f} ms the admin call alone",
            target=f"< {TARGET_P99 * 1000:,.0f} ms",
            met=percentile(routed, 0.99) < TARGET_P99,
        ),
        Figure(
            NAME,
            "health check fails -> traffic avoids the instance: p50",
            percentile(avoided, 0.5) * 1000,
            " ms",
            ceiling=rule,
        ),
        Figure(
            NAME,
            "health check fails -> traffic avoids the instance: p99",
            percentile(avoided, 0.99) * 1000,
            " ms",
            ceiling=rule,
            target=f"< {TARGET_P99 * 1000:,.0f} ms",
            met=percentile(avoided, 0.99) < TARGET_P99,
        ),
    ]


# -- the mesh ------------------------------------------------------------------------------


class App(ThreadingHTTPServer):
    """Answers its name; ``/healthz`` 200, or 503 while ``failing`` (each failed check's
    time kept in ``failed_checks``)."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.failing = False
        self.failed_checks: list[float] = []
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a check that timed out
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # headers and body in one write (flushed per request), not two: no Nagle wait
    server: App

    def do_GET(self) -> None:
        status = 200
        if self.path == "/healthz" and self.server.failing:
            self.server.failed_checks.append(time.perf_counter())
            status = 503
        body = self.server.name.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    health: int
    log_path: Path

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"tessera sidecar exited {self.process.returncode}:\n"
                f"{self.log_path.read_text(errors='replace')[-3000:]}"
            )
        try:
            return httpx.get(f"http://127.0.0.1:{self.health}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


@contextlib.contextmanager
def sidecar(
    tmp: Path,
    agent: Agent,
    name: str,
    spiffe_id: str,
    app: App,
    label: str,
    outbound: int | None = None,
) -> Iterator[Sidecar]:
    """``tessera sidecar run --proxy envoy`` in front of ``app``; stopped (drained) after."""
    health = free_port()
    args = [
        TESSERA,
        "sidecar",
        "run",
        "--proxy",
        "envoy",
        "--service",
        name.split("-", maxsplit=1)[0],
        "--spiffe-id",
        spiffe_id,
        "--app",
        app.address,
        "--inbound",
        f"127.0.0.1:{free_port()}",
        "--health-bind",
        f"127.0.0.1:{health}",
        "--label",
        label,
    ]
    if outbound is not None:
        args += ["--outbound", f"127.0.0.1:{outbound}"]
    log_path = tmp / f"{name}-sidecar.log"
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": str(agent.socket_path)}
    with log_path.open("ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield Sidecar(process, health, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _until(check: Any, what: str, deadline: float = DEADLINE) -> Any:
    began = time.monotonic()
    while not (found := check()):
        if time.monotonic() - began > deadline:
            raise RuntimeError(f"not {what} within {deadline:.0f}s")
        time.sleep(0.05)
    return found


@contextlib.contextmanager
def mesh(tmp: Path) -> Iterator[tuple[Server, httpx.Client, dict[str, App]]]:
    """The mesh, ready: (the server, a client of web's outbound for Host users, the apps)."""
    apps = {name: App(name) for name in ("a", "b", "web")}
    uid = f"unix:uid:{os.getuid()}"
    outbound = free_port()
    try:
        with running_server(tmp / "server") as server, \
                running_agent(server, tmp / "agent", alias=ALIAS) as agent, \
                contextlib.ExitStack() as stack:  # fmt: skip
            server.create_entries([entry_body(USERS, ALIAS, [uid]), entry_body(WEB, ALIAS, [uid])])
            agent.wait_for_svids(2, timeout=DEADLINE)
            apply(server, MESH)
            sidecars = [
                stack.enter_context(sidecar(tmp, agent, f"users-{n}", USERS, apps[n],
                                            f"version={n}"))
                for n in ("a", "b")
            ] + [stack.enter_context(sidecar(tmp, agent, "web", WEB, apps["web"], "app=web",
                                             outbound))]  # fmt: skip
            for one in sidecars:
                _until(one.ready, "ready")
            client = stack.enter_context(httpx.Client(
                base_url=f"http://127.0.0.1:{outbound}", headers={"Host": "users"},
                timeout=10))  # fmt: skip
            _until(lambda: _both_serve(client), "both users instances answering")
            yield server, client, apps
    finally:
        for app in apps.values():
            app.shutdown()
            app.server_close()


def apply(server: Server, text: str) -> int:
    answer = server.admin.post("/v1/mesh/apply", content=text.encode(),
                               headers={"content-type": "application/yaml"})  # fmt: skip
    return int(answer["revision"])


def _answer(client: httpx.Client) -> str:
    response = client.get("/")
    return response.text if response.status_code == 200 else f"{response.status_code}"


def _both_serve(client: httpx.Client) -> bool:
    return {_answer(client) for _ in range(6)} == {"a", "b"}


# -- a VirtualService change ---------------------------------------------------------------


def route_changes(
    server: Server, client: httpx.Client, rounds: int
) -> tuple[list[float], list[float]]:
    """(seconds from each apply to the first answer by the new subset, each admin call)."""
    apply(server, ROUTE.format(subset="a"))
    _until(lambda: all(_answer(client) == "a" for _ in range(4)), "routed to subset a")
    routed: list[float] = []
    admin_calls: list[float] = []
    for index in range(rounds):
        subset = "b" if index % 2 == 0 else "a"
        call: list[float] = []
        began = time.perf_counter()
        applying = threading.Thread(target=_timed_apply, args=(server, subset, call), daemon=True)
        applying.start()
        while _answer(client) != subset:
            if time.perf_counter() - began > DEADLINE:
                raise RuntimeError(f"no answer from subset {subset} {DEADLINE:.0f}s after apply")
        routed.append(time.perf_counter() - began)
        applying.join(DEADLINE)
        admin_calls.append(call[0])
    server.admin.delete("/v1/mesh/virtualservice/users")
    _until(lambda: _both_serve(client), "both instances serving without the VirtualService")
    return routed, admin_calls


def _timed_apply(server: Server, subset: str, seconds: list[float]) -> None:
    began = time.perf_counter()
    apply(server, ROUTE.format(subset=subset))
    seconds.append(time.perf_counter() - began)


# -- an instance turning unhealthy ---------------------------------------------------------


def unhealthy_instances(
    server: Server, client: httpx.Client, app: App, rounds: int
) -> tuple[list[float], list[float]]:
    """(seconds from ``app``'s first failed check to traffic avoiding it, seconds between
    its first and second failed checks), per round."""
    avoided: list[float] = []
    decided: list[float] = []
    for _ in range(rounds):
        app.failed_checks.clear()
        app.failing = True
        run_start: float | None = None
        in_a_row = 0
        began = time.perf_counter()
        while in_a_row < RUN:
            sent = time.perf_counter()
            if _answer(client) == "b":
                in_a_row += 1
                run_start = sent if in_a_row == SECOND else run_start
            else:
                in_a_row = 0
            if sent - began > DEADLINE:
                raise RuntimeError(
                    f"traffic still reaches {app.name} {DEADLINE:.0f}s after its "
                    "health check started failing"
                )
        assert run_start is not None
        first_failed = _until(lambda: app.failed_checks[:1], "a failed check")[0]
        avoided.append(run_start - first_failed)
        second = _until(lambda: app.failed_checks[1:2], "a second failed check")[0]
        decided.append(second - first_failed)
        app.failing = False
        _until(lambda: _both_serve(client), f"{app.name} serving again")
    return avoided, decided


if __name__ == "__main__":
    print(json.dumps([figure.__dict__ for figure in run(quick=True)], indent=2, default=str))
