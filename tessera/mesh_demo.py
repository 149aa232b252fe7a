"""``tessera demo`` with Envoy installed: a small mesh, end to end, each step printed as
it happens.

Everything is real: a server and an agent (as ``tessera up`` runs them), the mesh applied
with ``tessera mesh apply``, three ``tessera sidecar run --proxy envoy`` and one
``tessera gateway run`` (each supervising its own Envoy, configured by the agent over
xDS), and three small HTTP apps in this process::

    you ──http──▶ gateway ══mTLS══▶ users sidecar v1 ──▶ users app v1
                     │      ╚═mTLS═▶ users sidecar v2 ──▶ users app v2
                     ╚══mTLS══▶ orders sidecar ──▶ orders app ──▶ (its sidecar) ══▶ users
    intruder ══mTLS══▶ users sidecar  ✗ 403, no AuthorizationPolicy allows it

Every entry selects the uid running the demo, so each sidecar, the gateway, and the Envoy
each of them runs hold every SVID, and each picks its own with ``--spiffe-id``.

    tessera demo                          # about 45 s (--duration), the last step rotation
    tessera demo --duration 10 --svid-ttl 4
    tessera demo --output json            # the story on stderr, a summary on stdout

Ctrl-C (or SIGTERM) ends the steps and stops every process the demo started.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import httpx

from ca.entries import new_entry
from sdk import authorize_id
from sdk.address import unused_port
from sdk.der import split_certificates
from sdk.errors import ConfigError
from sdk.integrations.httpx import httpx_client
from sdk.sidecar.connect import connect_x509_source
from sdk.spiffeid import SpiffeId, parse_trust_domain
from tessera.up import LocalTrustDomain, UpSettings

__all__ = ["DemoStopped", "MeshDemo", "MeshDemoResult"]

TRUST_DOMAIN: Final = "demo.example"
IDENTITIES: Final = ("users", "orders", "gateway", "intruder")
USERS_PATH: Final = "/api/v1/users"
ORDERS_PATH: Final = "/api/v1/orders"
START_DEADLINE_SECONDS: Final = 30.0
STOP_DEADLINE_SECONDS: Final = 15.0
SPLIT_REQUESTS: Final = 200
LOAD_WORKERS: Final = 4
SPLIT_WORKERS: Final = 8
LOAD_PAUSE_SECONDS: Final = 0.02
"""Each load worker's pause between requests: a steady load, not a benchmark."""
FAILOVER_SECONDS: Final = 2.0
"""How long the load runs after an instance is killed."""
REQUEST_TIMEOUT_SECONDS: Final = 10.0
MAX_ANSWER_BYTES: Final = 64 * 1024


class DemoStopped(ConfigError):
    """SIGINT or SIGTERM ended the demo; every process it started is stopped."""


@dataclass
class MeshDemoResult:
    """What the demo showed; ``to_json`` is ``tessera demo --output json``."""

    routes: dict[str, list[str]] = field(default_factory=dict)
    service_call: str = ""
    split: dict[str, int] = field(default_factory=dict)
    failover: dict[str, Any] = field(default_factory=dict)
    refusal: str = ""
    refusal_reason: str = ""
    requests: int = 0
    """Requests under rotation, through the gateway."""
    failures: int = 0
    """Failed requests under rotation, plus those after the instance was killed."""
    rotations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IDENTITIES, 0))

    def to_json(self) -> dict[str, Any]:
        return {
            "mesh": True,
            "routes": self.routes,
            "service_call": self.service_call,
            "split": self.split,
            "failover": self.failover,
            "refused_call": self.refusal,
            "refused_because": self.refusal_reason,
            "requests": self.requests,
            "failures": self.failures,
            "rotations": self.rotations,
        }


def free_port() -> int:
    return unused_port()


def svid_serials(local: LocalTrustDomain, names: Collection[str]) -> dict[str, str]:
    """The serial (hex) of the current SVID of each entry whose hint is in ``names``, from
    the agent's cache: what the demos watch change as SVIDs rotate."""
    serials = {}
    for entry in local.agent.cache.entries.values():
        svid = local.agent.cache.svid_for(entry.id)
        if svid is not None and entry.hint in names:
            leaf = split_certificates(svid.cert_chain_der)[0]
            serials[entry.hint] = format(leaf.serial_number, "x")
    return serials


# -- the apps -------------------------------------------------------------------------------


class _App(ThreadingHTTPServer):
    """A service's app on loopback: answers with its name and who its sidecar said called.

    ``calls`` (orders): the address of its sidecar's outbound listener, through which it
    asks users-service for the user of each order. :meth:`kill` stops it as a crash would:
    the listener and every open connection close at once.
    """

    daemon_threads = True

    def __init__(self, name: str, calls: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _AppHandler)
        self.name = name
        self.calls = calls
        self.killed = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def track(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            (self._open.add if open_ else self._open.discard)(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A caller that went away (Envoy closing a connection) is no news."""

    def kill(self) -> None:
        self.killed = True
        self.shutdown()
        self.server_close()
        with self._lock:
            for connection in self._open:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if not self.killed:
            self.kill()


class _AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _App

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        if self.server.killed:
            self.close_connection = True
            return
        answer: dict[str, Any] = {
            "app": self.server.name,
            "path": self.path,
            "caller": self.headers.get("X-Forwarded-Client-Spiffe-Id"),
        }
        if self.server.calls and self.path.startswith(ORDERS_PATH):
            answer["user"] = self._ask_users()
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _ask_users(self) -> Any:
        """users-service, through this app's sidecar (which routes by Host)."""
        host, _, port = str(self.server.calls).rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            connection.request("GET", f"{USERS_PATH}/42", headers={"Host": "users-service"})
            reply = connection.getresponse()
            body = reply.read(MAX_ANSWER_BYTES)
        except OSError as err:
            return f"users-service unreachable: {err}"
        finally:
            connection.close()
        if reply.status != 200:
            return f"users-service answered {reply.status}"
        try:
            return json.loads(body)
        except ValueError:
            return "users-service answered something other than JSON"

    def log_message(self, *args: Any) -> None:
        return None


# -- the mesh's configuration ---------------------------------------------------------------


def _mesh_yaml(ids: dict[str, str], *, canary: bool) -> str:
    """The demo's resources; with ``canary``, users' route splits 90/10 between v1 and v2."""
    if canary:
        users_route = (
            "    route:\n"
            "    - destination: {host: users-service, subset: v1}\n      weight: 90\n"
            "    - destination: {host: users-service, subset: v2}\n      weight: 10\n"
        )
    else:
        users_route = "    route:\n    - destination: {host: users-service}\n"
    service = (
        "apiVersion: tessera.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\n"
        "spec:\n  spiffeIds: [{spiffe_id}]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n"
        "  healthCheck: {{http: {{path: /healthz}}, interval: 1s}}\n"
    )
    return "---\n".join([
        service.format(name="users-service", spiffe_id=ids["users"]),
        service.format(name="orders-service", spiffe_id=ids["orders"]),
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: demo-gateway}\n"
        "spec:\n  selector: {istio: ingressgateway}\n  servers:\n"
        "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: demo-routes}\n"
        "spec:\n  hosts: ['*']\n  gateways: [demo-gateway]\n  http:\n"
        f"  - match:\n    - uri: {{prefix: {USERS_PATH}}}\n{users_route}"
        "    retries: {attempts: 3, perTryTimeout: 2s, retryOn: '5xx,connect-failure,reset'}\n"
        f"  - match:\n    - uri: {{prefix: {ORDERS_PATH}}}\n"
        "    route:\n    - destination: {host: orders-service}\n",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: users-service}\nspec:\n  host: users-service\n  trafficPolicy:\n"
        "    loadBalancer: {simple: ROUND_ROBIN}\n"
        "    outlierDetection: {consecutive5xxErrors: 1, consecutiveGatewayErrors: 1, "
        "interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}\n"
        "  subsets:\n  - name: v1\n    labels: {version: v1}\n"
        "  - name: v2\n    labels: {version: v2}\n",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: users-allow-gateway-and-orders}\nspec:\n"
        "  selector: {matchLabels: {app: users}}\n  action: ALLOW\n  rules:\n"
        f"  - from:\n    - source: {{principals: ['{ids['gateway']}', '{ids['orders']}']}}\n",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: orders-allow-gateway}\nspec:\n"
        "  selector: {matchLabels: {app: orders}}\n  action: ALLOW\n  rules:\n"
        f"  - from:\n    - source: {{principals: ['{ids['gateway']}']}}\n",
    ])  # fmt: skip


# -- the processes ----------------------------------------------------------------------------


@dataclass
class _Proxy:
    """A ``tessera sidecar run`` or ``tessera gateway run`` the demo started."""

    name: str
    process: asyncio.subprocess.Process
    health: int
    log: Path
    ports: dict[str, int] = field(default_factory=dict)


class DemoBase:
    """What both demos do first: check the settings, and start a throw-away trust domain
    in ``workdir`` (:meth:`start_trust_domain`)."""

    def __init__(
        self,
        *,
        duration: float,
        svid_ttl: int,
        echo: Callable[[str], None],
        workdir: Path,
        names: Collection[str],
    ) -> None:
        if svid_ttl < 4:
            raise ConfigError("--svid-ttl must be at least 4 seconds")
        self.duration = duration
        self.svid_ttl = svid_ttl
        self.echo = echo
        self.workdir = workdir
        self.td = parse_trust_domain(TRUST_DOMAIN)
        self.ids = {name: f"spiffe://{TRUST_DOMAIN}/{name}" for name in names}

    async def start_trust_domain(self) -> tuple[LocalTrustDomain, asyncio.Task[None]]:
        """A server and an agent in one process, ready; the task running them."""
        local = LocalTrustDomain(
            UpSettings(self.td, self.workdir / "td", bind="127.0.0.1:0", health_bind="0"),
            progress=lambda line: None,
        )
        ready = asyncio.Event()
        running = asyncio.create_task(local.run(on_ready=lambda _: ready.set()))
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({running, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if running.done():
            running.result()
            raise ConfigError("the demo's trust domain stopped before it was ready")
        return local, running


class MeshDemo(DemoBase):
    def __init__(
        self,
        *,
        duration: float,
        svid_ttl: int,
        echo: Callable[[str], None],
        workdir: Path,
    ) -> None:
        super().__init__(duration=duration, svid_ttl=svid_ttl, echo=echo, workdir=workdir,
                         names=IDENTITIES)  # fmt: skip
        self.tessera = shutil.which("tessera", path=str(Path(sys.executable).parent)) or "tessera"
        self.proxies: list[_Proxy] = []
        self.apps: dict[str, _App] = {}
        self.gateway_url = ""
        self.result = MeshDemoResult()
        self._began = time.monotonic()
        self._stopped_by = ""

    async def run(self) -> MeshDemoResult:
        self.echo(f"Tessera mesh demo: trust domain {TRUST_DOMAIN}, in {self.workdir}\n")
        self.echo("1. Starting a server and an agent ...")
        local, running = await self.start_trust_domain()
        self.echo(f"   ready in {time.monotonic() - self._began:.1f}s")
        self._stop_on_signals()
        interrupted = False
        try:
            self._register(local)
            await self._apply(local, announce=True)
            await self._start_proxies(local)
            await self._route_by_uri()
            await self._canary(local)
            await self._kill_an_instance(local)
            await self._refuse_a_caller(local)
            await self._rotate_under_load(local)
        except asyncio.CancelledError:
            if not self._stopped_by:
                raise
            interrupted = True
        finally:
            await self._stop_proxies()
            for app in self.apps.values():
                app.close()
            local.agent.stop()
            await asyncio.gather(running, return_exceptions=True)
        if interrupted:
            raise DemoStopped(f"the demo was stopped ({self._stopped_by}) before it finished")
        return self.result

    def _stop_on_signals(self) -> None:
        """From now on SIGINT and SIGTERM end the demo's steps, and it cleans up (the
        trust domain's own handlers would stop the agent under the running steps). Later
        signals are ignored: the clean-up is bounded."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def stop(sig: signal.Signals) -> None:
            if not self._stopped_by and task is not None:
                self._stopped_by = sig.name
                self.echo(f"\n{sig.name}: stopping every process the demo started ...")
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)

    # -- 1. identities ------------------------------------------------------------------------

    def _register(self, local: LocalTrustDomain) -> None:
        self.echo(
            f"   entries by unix:uid:{os.getuid()} (X509-SVIDs live {self.svid_ttl} s), "
            "so the Envoys the sidecars run are attested too:"
        )
        notes = {
            "users": "serves users-service",
            "orders": "serves orders-service",
            "gateway": "the ingress gateway",
            "intruder": "a caller no policy allows",
        }
        for name in IDENTITIES:
            entry = new_entry(
                self.td,
                spiffe_id=self.ids[name],
                parent_id=f"spiffe://{TRUST_DOMAIN}/node/local",
                selectors=[f"unix:uid:{os.getuid()}"],
                x509_svid_ttl=self.svid_ttl,
                hint=name,
            )
            with contextlib.suppress(Exception):  # already there when the data dir is reused
                local.server.store.create_entry(entry)
            self.echo(f"     {self.ids[name]:<32} {notes[name]}")
        local.server.watcher.poke()
        self.echo("")

    # -- 2. the mesh's configuration -------------------------------------------------------

    async def _apply(self, local: LocalTrustDomain, *, canary: bool = False,
                     announce: bool = False) -> list[str]:  # fmt: skip
        """``tessera mesh apply -f -``; the lines it printed."""
        process = await asyncio.create_subprocess_exec(
            self.tessera, "mesh", "apply", "-f", "-",
            "--admin-socket", str(self._admin_socket(local)),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        yaml = _mesh_yaml(self.ids, canary=canary)
        (self.workdir / ("mesh-canary.yaml" if canary else "mesh.yaml")).write_text(yaml)
        out, err = await asyncio.wait_for(
            process.communicate(yaml.encode()), START_DEADLINE_SECONDS
        )
        if process.returncode != 0:
            raise ConfigError(f"tessera mesh apply refused the demo's mesh: {err.decode().strip()}")
        lines = [line.strip() for line in out.decode().splitlines() if line.strip()]
        if announce:
            self.echo("2. tessera mesh apply:")
            for line in lines:
                self.echo(f"     {line}")
            self.echo(f"     routes: {USERS_PATH} -> users-service, "
                      f"{ORDERS_PATH} -> orders-service; users allows gateway and orders, "
                      "orders allows gateway\n")  # fmt: skip
        return lines

    def _admin_socket(self, local: LocalTrustDomain) -> Path:
        return local.server.config.admin_socket_path

    # -- 3. apps, sidecars and the gateway ------------------------------------------------------

    async def _start_proxies(self, local: LocalTrustDomain) -> None:
        self.echo("3. Starting the apps, their Envoy sidecars and the gateway:")
        sock = str(local.agent.config.socket_path)
        users_args = {"v1": "users-v1", "v2": "users-v2"}
        for version, name in users_args.items():
            self.apps[name] = _App(name)
            await self._sidecar(name, "users-service", self.ids["users"], self.apps[name], sock,
                                ["app=users", f"version={version}"])  # fmt: skip
        outbound = free_port()
        self.apps["orders"] = _App("orders", calls=f"127.0.0.1:{outbound}")
        await self._sidecar("orders", "orders-service", self.ids["orders"], self.apps["orders"],
                            sock, ["app=orders", "version=v1"], outbound=outbound)  # fmt: skip
        offset = free_port() - 80
        health = free_port()
        await self._spawn("gateway", health, {"http": 80 + offset}, [
            "gateway", "run", "--label", "istio=ingressgateway", "--spiffe-id",
            self.ids["gateway"], "--port-offset", str(offset), "--socket", sock,
            "--health-bind", f"127.0.0.1:{health}",
        ])  # fmt: skip
        self.gateway_url = f"http://127.0.0.1:{80 + offset}"
        async with httpx.AsyncClient(timeout=2) as client:
            await asyncio.gather(*(self._wait_ready(client, proxy) for proxy in self.proxies))
        for proxy in self.proxies:
            if proxy.name == "gateway":
                where = f"http :{proxy.ports['http']} (Gateway port 80 + {offset})"
            else:
                app = self.apps[proxy.name]
                where = f"mTLS :{proxy.ports['inbound']} -> app {app.address}"
                if "outbound" in proxy.ports:
                    where += f"; its calls out: http :{proxy.ports['outbound']}"
            self.echo(f"     {proxy.name:<9} pid {proxy.process.pid:<7} {where}")
        self.echo(f"   every proxy ready at {self._clock()}\n")

    async def _sidecar(self, name: str, service: str, spiffe_id: str, app: _App, sock: str,
                       labels: list[str], outbound: int | None = None) -> None:  # fmt: skip
        ports = {"inbound": free_port()}
        health = free_port()
        args = ["sidecar", "run", "--proxy", "envoy", "--service", service,
                "--spiffe-id", spiffe_id, "--app", app.address,
                "--inbound", f"127.0.0.1:{ports['inbound']}", "--socket", sock,
                "--health-bind", f"127.0.0.1:{health}"]  # fmt: skip
        if outbound is not None:
            ports["outbound"] = outbound
            args += ["--outbound", f"127.0.0.1:{outbound}"]
        for label in labels:
            args += ["--label", label]
        await self._spawn(name, health, ports, args)

    async def _spawn(self, name: str, health: int, ports: dict[str, int], args: list[str]) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("w") as out:
            process = await asyncio.create_subprocess_exec(
                self.tessera, *args, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
            )
        self.proxies.append(_Proxy(name, process, health, log, ports))

    async def _wait_ready(self, client: httpx.AsyncClient, proxy: _Proxy) -> None:
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        problem = "it did not answer"
        while time.monotonic() < deadline:
            if proxy.process.returncode is not None:
                problem = f"it exited with status {proxy.process.returncode}"
                break
            try:
                answer = await client.get(f"http://127.0.0.1:{proxy.health}/ready")
                if answer.status_code == 200:
                    return
                problem = answer.json().get("reason", answer.text)
            except (httpx.HTTPError, ValueError) as err:
                problem = str(err) or type(err).__name__
            await asyncio.sleep(0.2)
        raise ConfigError(f"the {proxy.name} proxy was not ready ({problem}); "
                          f"see {proxy.log}")  # fmt: skip

    # -- 4. routing by URI --------------------------------------------------------------------

    async def _route_by_uri(self) -> None:
        self.echo("4. Through the gateway, routed by URI:")
        answered: dict[str, set[str]] = {USERS_PATH: set(), ORDERS_PATH: set()}
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS) as client:
            # Until every instance is healthy in the catalog and in the gateway's Envoy.
            deadline = time.monotonic() + START_DEADLINE_SECONDS
            while answered[USERS_PATH] != {"users-v1", "users-v2"} or not answered[ORDERS_PATH]:
                for path, apps in answered.items():
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        answer = await client.get(self.gateway_url + path)
                        if answer.status_code == 200:
                            apps.add(answer.json()["app"])
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"the gateway did not reach every instance in {START_DEADLINE_SECONDS:.0f}"
                        f" s (reached {sorted(answered[USERS_PATH] | answered[ORDERS_PATH])});"
                        f" see the logs in {self.workdir}"
                    )
                await asyncio.sleep(0.1)
            for _ in range(2):
                answer = await client.get(self.gateway_url + USERS_PATH)
                served = answer.json()
                self.echo(
                    f"     GET {USERS_PATH:<15} {answer.status_code} {served['app']:<9}"
                    f"(it saw caller {served['caller']})"
                )
            answer = await client.get(self.gateway_url + ORDERS_PATH)
            served = answer.json()
            user = served.get("user")
            user_app = user.get("app", "?") if isinstance(user, dict) else str(user)
            user_caller = user.get("caller", "?") if isinstance(user, dict) else "?"
            self.echo(
                f"     GET {ORDERS_PATH:<15} {answer.status_code} {served['app']:<9}"
                f"(it asked users-service through its sidecar: {user_app} answered,"
                f" seeing caller {user_caller})"
            )
            missing = await client.get(self.gateway_url + "/api/v2/nothing")
            self.echo(f"     GET /api/v2/nothing   {missing.status_code} (no route)\n")
        self.result.routes = {path: sorted(apps) for path, apps in answered.items()}
        self.result.service_call = f"orders -> users-service: {user_app} saw {user_caller}"

    # -- 5. a canary split --------------------------------------------------------------------

    async def _canary(self, local: LocalTrustDomain) -> None:
        self.echo("5. A canary: DestinationRule subsets v1/v2, the route weighted 90/10 ...")
        await self._apply(local, canary=True)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS) as client:
            await self._wait_for_split(client)
            counts = await self._count(client, SPLIT_REQUESTS)
        self.result.split = {"requests": SPLIT_REQUESTS, "v1": counts["users-v1"],
                             "v2": counts["users-v2"], "failed": counts["failed"]}  # fmt: skip
        self.echo(
            f"     {SPLIT_REQUESTS} requests to {USERS_PATH}: v1 {counts['users-v1']}, "
            f"v2 {counts['users-v2']}, failed {counts['failed']}"
        )
        await self._apply(local)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS) as client:
            await self._wait_for_round_robin(client)
        self.echo("     canary done: the route goes to every instance again\n")

    async def _wait_for_split(self, client: httpx.AsyncClient) -> None:
        """Until the gateway's Envoy has the weighted route. On one connection (one Envoy
        worker) round robin alternates, so 10 answers from v1 in a row mean the split."""
        await self._wait_for_answers(client, lambda apps: apps[-10:] == ["users-v1"] * 10,
                                     "the gateway splitting 90/10")  # fmt: skip

    async def _wait_for_round_robin(self, client: httpx.AsyncClient) -> None:
        """Until the gateway's Envoy has the route to every instance again: 10 answers
        alternating between v1 and v2 (under the 90/10 split, about 1 in 100,000)."""

        def alternating(apps: list[str]) -> bool:
            last = apps[-10:]
            return (len(last) == 10 and "failed" not in last
                    and all(a != b for a, b in itertools.pairwise(last)))  # fmt: skip

        await self._wait_for_answers(client, alternating, "the gateway's round robin again")

    async def _wait_for_answers(
        self, client: httpx.AsyncClient, done: Callable[[list[str]], bool], what: str
    ) -> None:
        apps: list[str] = []
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while not done(apps):
            if time.monotonic() > deadline:
                raise ConfigError(f"the demo waited in vain for {what}; see {self.workdir}")
            apps.append(await self._get(client, USERS_PATH))

    async def _count(self, client: httpx.AsyncClient, requests: int) -> Counter[str]:
        counts: Counter[str] = Counter({"users-v1": 0, "users-v2": 0, "failed": 0})
        left = iter(range(requests))

        async def worker() -> None:
            for _ in left:
                counts[await self._get(client, USERS_PATH)] += 1

        await asyncio.gather(*(worker() for _ in range(SPLIT_WORKERS)))
        return counts

    async def _get(self, client: httpx.AsyncClient, path: str) -> str:
        """Which app answered, or ``failed``."""
        try:
            answer = await client.get(self.gateway_url + path)
            if answer.status_code == 200:
                return str(answer.json()["app"])
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        return "failed"

    # -- 6. an instance killed under load -----------------------------------------------------

    async def _kill_an_instance(self, local: LocalTrustDomain) -> None:
        self.echo(
            f"6. users-v2's app killed under load ({LOAD_WORKERS} callers through the gateway):"
        )
        before: Counter[str] = Counter()
        after: Counter[str] = Counter()
        killed = asyncio.Event()
        stop = asyncio.Event()

        async def worker(client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                (after if killed.is_set() else before)[await self._get(client, USERS_PATH)] += 1
                await asyncio.sleep(LOAD_PAUSE_SECONDS)

        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS) as client:
            load = [asyncio.create_task(worker(client)) for _ in range(LOAD_WORKERS)]
            try:
                await self._until(lambda: before["users-v2"] >= 5, "users-v2 answering")
                self.apps["users-v2"].kill()
                killed.set()
                self.echo(
                    f"     [{self._clock()}] killed users-v2's app after "
                    f"{sum(before.values())} requests ({self._tally(before)})"
                )
                await asyncio.sleep(FAILOVER_SECONDS)
            finally:
                stop.set()
                await asyncio.gather(*load)
        self.echo(
            f"     [{self._clock()}] the {sum(after.values())} requests since: {self._tally(after)}"
        )
        unhealthy = await self._catalog_health(local, "users-v2")
        self.echo(
            f"     outlier detection and retries routed around it; "
            f"the agent's health check marks it {unhealthy}\n"
        )
        self.result.failover = {
            "killed": "users-v2", "requests": sum(after.values()), "failures": after["failed"],
            "answered_after": {k: v for k, v in after.items() if k != "failed"},
        }  # fmt: skip
        self.result.failures += after["failed"]

    async def _catalog_health(self, local: LocalTrustDomain, name: str) -> str:
        """The users-v2 instance's health in ``tessera mesh services``, once it is not
        healthy (or what it says after a deadline)."""
        port = next(p.ports["inbound"] for p in self.proxies if p.name == name)
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        health = "unknown"
        while time.monotonic() < deadline:
            process = await asyncio.create_subprocess_exec(
                self.tessera, "mesh", "services", "--output", "json",
                "--admin-socket", str(self._admin_socket(local)),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out, _ = await process.communicate()
            with contextlib.suppress(ValueError):
                for instance in json.loads(out or b"[]"):
                    if instance.get("address") == f"127.0.0.1:{port}":
                        health = str(instance.get("health"))
            if health == "unhealthy":
                break
            await asyncio.sleep(0.3)
        return f"{health} in tessera mesh services"

    # -- 7. a refused caller ------------------------------------------------------------------

    async def _refuse_a_caller(self, local: LocalTrustDomain) -> None:
        self.echo("7. A caller no policy allows, straight to users-v1's sidecar over mTLS:")
        port = next(p.ports["inbound"] for p in self.proxies if p.name == "users-v1")
        endpoint = f"unix://{local.agent.config.socket_path}"

        def call() -> httpx.Response:  # in a thread: the agent answers on this loop
            source = connect_x509_source(endpoint, spiffe_id=SpiffeId(self.ids["intruder"]))
            try:
                with httpx_client(source, authorize_id(SpiffeId(self.ids["users"])),
                                  timeout=REQUEST_TIMEOUT_SECONDS) as client:  # fmt: skip
                    return client.get(f"https://127.0.0.1:{port}{USERS_PATH}")
            finally:
                source.close()

        answer = await asyncio.to_thread(call)
        self.result.refusal = f"{answer.status_code} {answer.text.strip()}"
        self.echo(f"     {self.ids['intruder']} -> users-service: {self.result.refusal}")
        process = await asyncio.create_subprocess_exec(
            self.tessera, "mesh", "explain", "--from", self.ids["intruder"],
            "--to", "users-service", "--path", USERS_PATH,
            "--admin-socket", str(self._admin_socket(local)),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await process.communicate()
        lines = [line.strip() for line in out.decode().splitlines() if line.strip()]
        why = next((line for line in lines if line.startswith("refused by")),
                   lines[-1] if lines else "")  # fmt: skip
        self.result.refusal_reason = why
        self.echo(f"     tessera mesh explain says: {why}\n")

    # -- 8. rotation under load ---------------------------------------------------------------

    async def _rotate_under_load(self, local: LocalTrustDomain) -> None:
        seconds = max(self.duration - (time.monotonic() - self._began), 1.5 * self.svid_ttl)
        self.echo(
            f"8. SVIDs rotating every ~{self.svid_ttl / 2:.0f} s for {seconds:.0f} s,"
            f" {LOAD_WORKERS} callers through the gateway all along:"
        )
        serials = self._serials(local)
        stop = asyncio.Event()
        counts: Counter[str] = Counter()
        paths = (USERS_PATH, ORDERS_PATH)

        async def worker(client: httpx.AsyncClient, n: int) -> None:
            while not stop.is_set():
                counts[await self._get(client, paths[n % 2])] += 1
                n += 1
                await asyncio.sleep(LOAD_PAUSE_SECONDS)

        began = time.monotonic()
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS) as client:
            load = [asyncio.create_task(worker(client, n)) for n in range(LOAD_WORKERS)]
            try:
                while (elapsed := time.monotonic() - began) < seconds:
                    current = self._serials(local)
                    for name in IDENTITIES:
                        if current.get(name) and current[name] != serials.get(name):
                            if serials.get(name):
                                self.result.rotations[name] += 1
                                self.echo(
                                    f"     [{elapsed:5.1f}s] {name:<8} new SVID, serial "
                                    f"{current[name][:12]}...; {counts.total()} requests, "
                                    f"{counts['failed']} failed"
                                )
                            serials[name] = current[name]
                    await asyncio.sleep(0.1)
            finally:
                stop.set()
                await asyncio.gather(*load)
        self.result.requests = counts.total()
        self.result.failures += counts["failed"]
        rotations = sum(self.result.rotations.values())
        self.echo(
            f"\nDone: {self.result.requests} requests through the gateway while "
            f"{rotations} SVIDs rotated, {counts['failed']} failed "
            f"({self._tally(counts)})."
        )

    def _serials(self, local: LocalTrustDomain) -> dict[str, str]:
        return svid_serials(local, IDENTITIES)

    # -- helpers ------------------------------------------------------------------------------

    def _clock(self) -> str:
        return f"{time.monotonic() - self._began:.1f}s"

    @staticmethod
    def _tally(counts: Counter[str]) -> str:
        answered = [f"{name} {counts[name]}" for name in sorted(counts) if name != "failed"]
        return ", ".join([*answered, f"failed {counts['failed']}"])

    async def _until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while not done():
            if time.monotonic() > deadline:
                raise ConfigError(f"the demo waited in vain for {what}; see {self.workdir}")
            await asyncio.sleep(0.05)

    async def _stop_proxies(self) -> None:
        """SIGTERM every proxy at once (each drains its Envoy), SIGKILL what is left."""
        for proxy in self.proxies:
            if proxy.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proxy.process.terminate()
        waits = [proxy.process.wait() for proxy in self.proxies]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), STOP_DEADLINE_SECONDS)
        for proxy in self.proxies:
            if proxy.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proxy.process.kill()
                await proxy.process.wait()
