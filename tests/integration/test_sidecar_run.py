"""`tessera sidecar run` as users run it: a real server and agent, ``tessera mesh apply`` of
the example in docs/sidecar.md, a tiny HTTP app, the sidecar in front of it (started as
the page shows), and callers holding SVIDs from the Workload API.

One trust domain for the module (``sidecar_fixtures.trust_domain``); every entry selects
this test's uid, and each process picks its SVID by SPIFFE ID:

    users      the sidecar (the Service's SPIFFE ID)
    web        the caller the docs' AuthorizationPolicy allows
    intruder   a caller no policy names
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import shlex
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from spiffe import SpiffeId

from dataplane.registration import InstanceRegistration
from sdk import WorkloadApiX509Source, authorize_id, mtls_client_context
from sdk.address import HostPort
from sdk.backoff import Backoff
from sdk.integrations.httpx import httpx_client
from sdk.sidecar.connect import connect_x509_source
from tests.integration.conftest import TESSERA, free_port, tessera
from tests.integration.sidecar_fixtures import (
    Entry,
    TrustDomain,
    processes,
    trust_domain,
)
from tests.support.processes import Process, poll

pytestmark = pytest.mark.integration

USERS = "spiffe://example.org/users"
WEB = "spiffe://example.org/web"
INTRUDER = "spiffe://example.org/intruder"
ENTRIES = [Entry(USERS), Entry(WEB), Entry(INTRUDER)]
PAGE = Path(__file__).resolve().parents[2] / "docs" / "sidecar.md"
DEADLINE = 10.0

NO_ADMIN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: users-no-admin}
spec:
  selector: {matchLabels: {app: users}}
  action: DENY
  rules:
  - to:
    - operation: {methods: [DELETE], paths: ["/admin"]}
"""


def page_example() -> tuple[str, list[str]]:
    """The YAML and the ``tessera sidecar run`` arguments of docs/sidecar.md's example."""
    section = PAGE.read_text().partition("## `tessera sidecar run`")[2]
    yaml = re.search(r"^```yaml\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    command = re.search(r"^(tessera sidecar run .*)$", section, re.MULTILINE)
    assert yaml is not None and command is not None
    return yaml.group(1), shlex.split(command.group(1))[1:]


# -- the trust domain, the mesh, the app ---------------------------------------------------


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    with trust_domain(tmp_path_factory.mktemp("sidecar-run"), ENTRIES) as running:
        yield running


def mesh(domain: TrustDomain, *args: str, stdin: str | None = None) -> str:
    return tessera("mesh", *args, "--data-dir", str(domain.server.data_dir), input=stdin).stdout


@pytest.fixture(scope="module")
def applied(domain: TrustDomain) -> TrustDomain:
    yaml, _ = page_example()
    assert mesh(domain, "apply", "-f", "-", stdin=yaml) == (
        "Service users-service created\nAuthorizationPolicy users-allow-web created\n")
    return domain


class App(ThreadingHTTPServer):
    """The app: answers with who the sidecar said called; /healthz as ``healthy`` says."""

    daemon_threads = True
    healthy = True


class AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: App

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200 if self.server.healthy else 503, {"healthy": self.server.healthy})
            return
        self._answer(200, {"method": self.command, "path": self.path,
                           "caller": self.headers.get_all("X-Forwarded-Client-Spiffe-Id")})

    do_DELETE = do_GET

    def _answer(self, status: int, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    server = App(("127.0.0.1", 0), AppHandler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def healthy_app(app: App) -> Iterator[App]:
    app.healthy = True
    yield app
    app.healthy = True


# -- the sidecar -----------------------------------------------------------------------------


@dataclass
class Sidecar:
    process: Process
    inbound: int
    health: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.inbound}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.health}{path}", timeout=5)

    def metric(self, name: str, **labels: str) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return float(sample.value)
        return None


def sidecar_args(app: App, inbound: int, health: int, *extra: str) -> list[str]:
    """The page's command, with this test's app, ports and socket."""
    _, args = page_example()
    at = args.index("--app")
    args[at + 1] = f"127.0.0.1:{app.server_address[1]}"
    return [TESSERA, *args, "--inbound", f"127.0.0.1:{inbound}",
            "--health-bind", f"127.0.0.1:{health}", *extra]


@pytest.fixture
def start_sidecar(domain: TrustDomain, tmp_path: Path) -> Iterator[Any]:
    with processes() as start:

        def run(app: App, *extra: str, ready: bool = True) -> Sidecar:
            inbound, health = free_port(), free_port()
            process = start("sidecar", sidecar_args(app, inbound, health, *extra),
                            directory=tmp_path, env=domain.env())
            sidecar = Sidecar(process, inbound, health)
            if ready:
                process.wait_until(lambda: sidecar.get("/ready").status_code == 200 or None,
                                   "answering /ready with 200", DEADLINE)
            return sidecar

        yield run


def instances(domain: TrustDomain) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(mesh(domain, "services", "--output", "json"))
    return listed


def instance_at(domain: TrustDomain, address: str, health: str) -> dict[str, Any]:
    """The catalog's instance at ``address`` once its health is ``health``."""

    def found() -> dict[str, Any] | None:
        for instance in instances(domain):
            if instance["address"] == address and instance["health"] == health:
                return instance
        return None

    return poll(found, DEADLINE, f"an instance at {address} {health} in tessera mesh services")


# -- callers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def callers(domain: TrustDomain) -> Iterator[dict[str, WorkloadApiX509Source]]:
    sources = {spiffe_id: connect_x509_source(domain.endpoint, spiffe_id=SpiffeId(spiffe_id))
               for spiffe_id in (WEB, INTRUDER)}
    yield sources
    for source in sources.values():
        source.close()


def connection(source: WorkloadApiX509Source, sidecar: Sidecar) -> http.client.HTTPSConnection:
    """One kept-alive HTTPS connection to the sidecar, which must present the users SVID."""
    context = mtls_client_context(source, authorize_id(USERS))
    return http.client.HTTPSConnection("127.0.0.1", sidecar.inbound, context=context, timeout=10)


def ask(conn: http.client.HTTPSConnection, method: str, path: str,
        headers: dict[str, str] | None = None) -> tuple[int, str, socket.socket | None]:
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read().decode(), conn.sock


# -- the scenarios -----------------------------------------------------------------------------


def test_the_instance_is_registered_healthy_and_follows_the_apps_health(
    applied: TrustDomain, healthy_app: App, start_sidecar: Any
) -> None:
    sidecar = start_sidecar(healthy_app)
    instance = instance_at(applied, sidecar.address, "healthy")
    assert (instance["service"], instance["labels"], instance["spiffeId"]) == (
        "users-service", {"app": "users"}, USERS)
    assert sidecar.get("/ready").json() == {"status": "ready"}
    assert sidecar.metric("tessera_sidecar_registered") == 1
    assert sidecar.metric("tessera_sidecar_instance_health", health="healthy") == 1
    assert sidecar.metric("tessera_sidecar_mesh_revision") >= 1  # type: ignore[operator]

    healthy_app.healthy = False
    instance_at(applied, sidecar.address, "unhealthy")
    poll(lambda: sidecar.metric("tessera_sidecar_instance_health", health="unhealthy") == 1
         or None, DEADLINE, "the sidecar's /metrics showing the instance unhealthy")
    assert sidecar.get("/ready").status_code == 200  # the app's health is the agent's call

    healthy_app.healthy = True
    instance_at(applied, sidecar.address, "healthy")


def test_an_allowed_caller_reaches_the_app_and_a_refused_one_gets_403_naming_the_rule(
    applied: TrustDomain, healthy_app: App, start_sidecar: Any,
    callers: dict[str, WorkloadApiX509Source],
) -> None:  # fmt: skip
    sidecar = start_sidecar(healthy_app)
    url = f"https://{sidecar.address}/api/users"

    with httpx_client(callers[WEB], authorize_id(USERS), timeout=10) as client:
        allowed = client.get(url, headers={"X-Forwarded-Client-Spiffe-Id": INTRUDER,
                                           "X_Forwarded_Client_Spiffe_Id": INTRUDER})
    assert allowed.status_code == 200, allowed.text
    assert allowed.json() == {"method": "GET", "path": "/api/users", "caller": [WEB]}

    with httpx_client(callers[INTRUDER], authorize_id(USERS), timeout=10) as client:
        refused = client.get(url)
    assert (refused.status_code, refused.headers["connection"], refused.text) == (
        403, "close",
        f"{INTRUDER} refused by policy rule 'AuthorizationPolicy users-allow-web': no ALLOW "
        f"rule names {INTRUDER}, and AuthorizationPolicy users-allow-web (ALLOW) selects this "
        "workload: refused by default\n")  # fmt: skip
    assert sidecar.metric("tessera_sidecar_decisions_total", listener="inbound",
                          stage="handshake", result="refused",
                          rule="AuthorizationPolicy users-allow-web") == 1  # fmt: skip


def test_a_policy_applied_judges_the_next_request_on_an_open_connection(
    applied: TrustDomain, healthy_app: App, start_sidecar: Any,
    callers: dict[str, WorkloadApiX509Source],
) -> None:  # fmt: skip
    sidecar = start_sidecar(healthy_app)
    conn = connection(callers[WEB], sidecar)
    status, _, first_socket = ask(conn, "DELETE", "/admin")
    assert status == 200
    try:
        mesh(applied, "apply", "-f", "-", stdin=NO_ADMIN)

        def refused() -> tuple[int, str, socket.socket | None] | None:
            answer = ask(conn, "DELETE", "/admin")
            return answer if answer[0] == 403 else None

        status, body, same_socket = poll(refused, DEADLINE, "DELETE /admin refused")
        assert body == (
            f"{WEB} refused by policy rule 'AuthorizationPolicy users-no-admin spec.rules[0]': "
            f"{WEB} is refused by a DENY rule for DELETE /admin\n")  # fmt: skip
        assert same_socket is first_socket  # judged anew, on the connection it had
        assert ask(conn, "GET", "/admin")[0] == 200
    finally:
        conn.close()
        mesh(applied, "delete", "authorizationpolicy", "users-no-admin")


def test_stopping_the_sidecar_removes_the_instance_at_once(
    applied: TrustDomain, healthy_app: App, start_sidecar: Any
) -> None:
    sidecar = start_sidecar(healthy_app)
    instance_at(applied, sidecar.address, "healthy")

    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.process.wait(timeout=DEADLINE) == 0
    poll(lambda: all(i["address"] != sidecar.address for i in instances(applied)) or None,
         3.0, "the instance gone from tessera mesh services")
    assert "Sidecar stopped." in sidecar.process.log()


def test_a_service_applied_later_takes_the_sidecar_waiting_for_it(
    domain: TrustDomain, healthy_app: App, start_sidecar: Any
) -> None:
    sidecar = start_sidecar(healthy_app, "--service", "later-service", ready=False)

    def not_ready() -> str | None:
        answer = sidecar.get("/ready")
        reason: str = answer.json().get("reason", "")
        # Not "registering" (the first call on its way): the agent's answer to it.
        return reason if answer.status_code == 503 and "there is no" in reason else None

    reason = sidecar.process.wait_until(not_ready, "/ready saying why it is not registered",
                                        DEADLINE)  # fmt: skip
    assert reason == (
        "not registered as an instance of later-service: there is no Service later-service; "
        "apply one (kind: Service, tessera.io/v1alpha1) naming the SPIFFE IDs that may serve it")
    assert sidecar.metric("tessera_sidecar_registered") == 0

    yaml, _ = page_example()
    later = yaml.replace("name: users-service", "name: later-service")
    mesh(domain, "apply", "-f", "-", stdin=later)
    try:
        sidecar.process.wait_until(lambda: sidecar.get("/ready").status_code == 200 or None,
                                   "ready once the Service exists", 15.0)
        instance_at(domain, sidecar.address, "healthy")
    finally:
        sidecar.process.stop()
        mesh(domain, "delete", "service", "later-service")


def test_a_refused_registration_warns_once_and_tries_again_when_the_mesh_changes(
    applied: TrustDomain, healthy_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    """A sidecar started with a Service name that is not there: one WARNING saying which
    Service the user may have meant, DEBUG for the retries, and registered as soon as the
    Service is applied, though its backoff would wait an hour."""
    caplog.set_level(logging.DEBUG, logger="tessera.sidecar")
    yaml, _ = page_example()
    typo = yaml.split("---\n")[0].replace("name: users-service", "name: user-service")
    refusal = (
        "user-service is not registered: there is no Service user-service; did you mean "
        "users-service? If not, apply one (kind: Service, tessera.io/v1alpha1) naming the "
        "SPIFFE IDs that may serve it; trying again when the mesh changes"
    )

    def said(level: int) -> list[str]:
        return [record.getMessage() for record in caplog.records
                if record.levelno == level and record.name == "tessera.sidecar"
                and "user-service is not registered" in record.getMessage()]  # fmt: skip

    async def until(condition: Any, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        registration = InstanceRegistration(
            socket=applied.endpoint, service="user-service", spiffe_id=USERS,
            address=HostPort("127.0.0.1", free_port()),
            check_address=HostPort("127.0.0.1", healthy_app.server_address[1]),
            labels={"app": "users"}, backoff=Backoff(initial=3600.0, maximum=3600.0),
        )  # fmt: skip
        task = asyncio.create_task(registration.run())
        try:
            # Refused, then again at once as the watch of the mesh starts: logged once.
            await until(lambda: said(logging.DEBUG), "the refusal met a second time")
            assert said(logging.WARNING) == [refusal]
            assert said(logging.DEBUG) == [refusal]
            assert not registration.registered
            await asyncio.to_thread(mesh, applied, "apply", "-f", "-", stdin=typo)
            await until(lambda: registration.registered, "registered once the Service exists")
            assert said(logging.WARNING) == [refusal]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        mesh(applied, "delete", "service", "user-service")


def test_an_inbound_address_in_use_is_refused_before_anything_is_registered(
    applied: TrustDomain, healthy_app: App, start_sidecar: Any
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        sidecar = start_sidecar(healthy_app, "--inbound", f"127.0.0.1:{port}", ready=False)
        assert sidecar.process.wait(timeout=DEADLINE) == 1
    assert (f"Error: cannot listen on --inbound 127.0.0.1:{port}: Address already in use; "
            "choose another --inbound\n") in sidecar.process.log()
    assert all(i["address"] != f"127.0.0.1:{port}" for i in instances(applied))


def test_an_outbound_address_in_use_is_refused_in_one_sentence(
    applied: TrustDomain, healthy_app: App, start_sidecar: Any
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        sidecar = start_sidecar(healthy_app, "--outbound", f"127.0.0.1:{port}", ready=False)
        assert sidecar.process.wait(timeout=DEADLINE) == 1
    assert (f"Error: cannot listen on --outbound 127.0.0.1:{port}: Address already in use; "
            "choose another --outbound\n") in sidecar.process.log()

