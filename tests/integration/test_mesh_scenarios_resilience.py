"""The mesh's resilience scenarios, on real processes: a crashed instance ejected by outlier
detection, a caller no AuthorizationPolicy names refused (and the reason in the access
log), SVIDs rotating under load. Each case runs against each data plane
(:func:`~tests.integration.mesh_fixtures.supported_by`).

One trust domain for the module; every entry selects this test's uid:

    users      users-service's instances (a health check an hour apart: only outlier
               detection can route around a crash within this test)
    web        the caller users-service's AuthorizationPolicy allows
    intruder   a caller no policy names
    orders     orders-service, with SVIDs living 4 s (rotated about every 2 s)
    reports    the caller of orders-service, with SVIDs living 4 s too
"""

from __future__ import annotations

import http.client
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from spiffe import SpiffeId

from sdk import WorkloadApiX509Source, authorize_id, mtls_client_context
from sdk.integrations.httpx import httpx_client
from sdk.sidecar.connect import connect_x509_source
from tests.integration.mesh_fixtures import (
    DEADLINE,
    App,
    Proxy,
    ProxyStarter,
    healthy,
    instances,
    supported_by,
)
from tests.integration.sidecar_fixtures import Entry, TrustDomain, processes, trust_domain
from tests.support.processes import poll

pytestmark = [pytest.mark.integration, pytest.mark.envoy]

USERS = "spiffe://example.org/users"
WEB = "spiffe://example.org/web"
INTRUDER = "spiffe://example.org/intruder"
ORDERS = "spiffe://example.org/orders"
REPORTS = "spiffe://example.org/reports"
SVID_TTL = 4
CONSECUTIVE_5XX = 3
USERS_CLUSTER = "outbound|80||users-service"
ORDERS_CLUSTER = "outbound|80||orders-service"

MESH = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users-service}}
spec:
  spiffeIds: [{USERS}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  healthCheck: {{http: {{path: /healthz}}, interval: 1h}}
---
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: web-service}}
spec:
  spiffeIds: [{WEB}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: intruder-service}}
spec:
  spiffeIds: [{INTRUDER}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: orders-service}}
spec:
  spiffeIds: [{ORDERS}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: reports-service}}
spec:
  spiffeIds: [{REPORTS}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: users-eject}}
spec:
  host: users-service
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection:
      consecutive5xxErrors: {CONSECUTIVE_5XX}
      interval: 1s
      baseEjectionTime: 5m
      maxEjectionPercent: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: users-no-retries}}
spec:
  hosts: [users-service]
  http:
  - route:
    - destination: {{host: users-service}}
    retries: {{attempts: 0}}      # each failure reaches the caller: they can be counted
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: users-allow-web}}
spec:
  selector: {{matchLabels: {{app: users}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["{WEB}"]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: users-no-admin}}
spec:
  selector: {{matchLabels: {{app: users}}}}
  action: DENY
  rules:
  - to:
    - operation: {{methods: [DELETE], paths: ["/admin"]}}
"""


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    entries = [Entry(USERS), Entry(WEB), Entry(INTRUDER), Entry(ORDERS, ttl=SVID_TTL),
               Entry(REPORTS, ttl=SVID_TTL)]  # fmt: skip
    with trust_domain(tmp_path_factory.mktemp("resilience"), entries) as running:
        running.admin().post("/v1/mesh/apply", content=MESH.encode(),
                             headers={"content-type": "application/yaml"})  # fmt: skip
        yield running


@pytest.fixture
def start(domain: TrustDomain, tmp_path: Path) -> Iterator[ProxyStarter]:
    """A test's proxies, stopped when it ends (passed or not): a failed test's instances
    do not stay in the catalog to take the next test's requests."""
    with processes() as begin:
        yield ProxyStarter(domain, begin, tmp_path)


@pytest.fixture(scope="module")
def callers(domain: TrustDomain) -> Iterator[dict[str, WorkloadApiX509Source]]:
    sources = {spiffe_id: connect_x509_source(domain.endpoint, spiffe_id=SpiffeId(spiffe_id))
               for spiffe_id in (WEB, INTRUDER, REPORTS)}  # fmt: skip
    yield sources
    for source in sources.values():
        source.close()


class Apps(dict[str, App]):
    """``apps["users-1"]``: an app started on first use."""

    def __missing__(self, name: str) -> App:
        app = self[name] = App.serving(name)
        return app


@pytest.fixture
def apps() -> Iterator[Apps]:
    started = Apps()
    yield started
    for app in started.values():
        app.stop()


def envoy_samples(proxy: Proxy, name: str, cluster: str) -> float:
    """The value of Envoy's stat ``name`` for ``cluster``, from the sidecar's /metrics."""
    names = set()
    for family in text_string_to_metric_families(proxy.get("/metrics").text):
        for sample in family.samples:
            if sample.labels.get("envoy_cluster_name") == cluster:
                if sample.name == name:
                    return float(sample.value)
                names.add(sample.name)
    raise AssertionError(f"no {name} for {cluster} in the sidecar's /metrics: {sorted(names)}")


def builtin_samples(proxy: Proxy, name: str, cluster: str) -> dict[str, float]:
    """A built-in sidecar's samples of ``name`` for ``cluster`` from its /metrics, by their
    ``reason`` label ("" without one)."""
    return {
        sample.labels.get("reason", ""): float(sample.value)
        for family in text_string_to_metric_families(proxy.get("/metrics").text)
        for sample in family.samples
        if sample.name == name and sample.labels.get("cluster") == cluster
    }


def outbound_get(proxy: Proxy, path: str, host: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{proxy.ports['outbound']}{path}",
                     headers={"Host": host}, timeout=10)  # fmt: skip


def stop(*proxies: Proxy) -> None:
    """Stop ``proxies`` together (each drains its Envoy), as a user would with SIGTERM."""
    for proxy in proxies:
        proxy.process.send_signal(signal.SIGTERM)
    for proxy in proxies:
        assert proxy.process.wait(timeout=DEADLINE) == 0, proxy.process.log()


# -- ejection ----------------------------------------------------------------------------------


@dataclass
class Requests:
    """A caller sending requests one after the other through ``proxy``'s outbound, in a
    thread, on one kept-alive connection, until stopped; each answer's (status, app)."""

    proxy: Proxy
    host: str
    answers: list[tuple[int, str]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.proxy.ports['outbound']}",
                          headers={"Host": self.host}, timeout=10) as client:  # fmt: skip
            while not self.stopping.is_set():
                try:
                    answer = client.get("/api/users")
                except httpx.TransportError as err:  # a cut answer: 0, and the next one
                    status, app = 0, f"{type(err).__name__}: {err}"
                else:
                    status = answer.status_code
                    app = answer.json()["app"] if status == 200 else answer.text
                with self._lock:
                    self.answers.append((status, app))

    def seen(self) -> list[tuple[int, str]]:
        with self._lock:
            return list(self.answers)

    def stop(self) -> list[tuple[int, str]]:
        self.stopping.set()
        self._thread.join(DEADLINE)
        return self.seen()


@supported_by("envoy", "builtin",
              case="outlier detection ejects a crashed instance before any health check")
def test_a_crashed_instance_is_ejected_after_a_few_failures_before_any_health_check(
    plane: str, domain: TrustDomain, start: ProxyStarter, apps: Apps
) -> None:
    web = start.sidecar(f"eject-web-{plane}", "web-service", WEB, apps["web"], "app=web",
                        outbound=True, plane=plane)  # fmt: skip
    users = [start.sidecar(f"eject-users-{n}-{plane}", "users-service", USERS,
                           apps[f"users-{n}"], "app=users", plane=plane)
             for n in (1, 2)]  # fmt: skip
    for proxy in (web, *users):
        proxy.wait_ready()
    for proxy in users:
        healthy(domain, proxy.address)
    poll(lambda: {outbound_get(web, "/", "users-service").json()["app"]
                  for _ in range(4)} == {"users-1", "users-2"} or None,
         DEADLINE, "web's Envoy balancing over both users instances")  # fmt: skip

    requests = Requests(web, "users-service")
    try:
        poll(lambda: {app for _, app in requests.seen()} >= {"users-1", "users-2"} or None,
             DEADLINE, "requests reaching both instances")  # fmt: skip
        before = len(requests.seen())
        apps["users-1"].kill()

        def ejected_then_served() -> list[tuple[int, str]] | None:
            after = requests.seen()[before:]
            failed = [n for n, (status, _) in enumerate(after) if status != 200]
            if not failed or len(after) - failed[-1] - 1 < 50:
                return None
            return after

        after = poll(ejected_then_served, DEADLINE, "failures, then 50 requests served in a row")
    finally:
        answers = requests.stop()
    failures = [answer for answer in answers[before:] if answer[0] != 200]
    last_failure = max(n for n, answer in enumerate(answers) if answer[0] != 200)
    # With retries off, the requests users-1 gets between the crash and its ejection fail
    # (503 from its sidecar): a handful when each takes a while, hundreds at the
    # thousand a second this loop sends, before Envoy's ejection takes effect. Then none
    # fails, and users-2 serves them all.
    assert len(failures) >= 1, failures
    assert {status for status, _ in failures} == {503}, failures
    assert {app for _, app in answers[last_failure + 1 :]} == {"users-2"}
    assert len(after) >= 50
    if plane == "envoy":
        ejections = "envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx_total"
        assert envoy_samples(web, ejections, USERS_CLUSTER) == 1
        active = "envoy_cluster_outlier_detection_ejections_active"
        assert envoy_samples(web, active, USERS_CLUSTER) == 1
    else:
        ejections = builtin_samples(web, "tessera_sidecar_outlier_ejections_total", USERS_CLUSTER)
        assert ejections == {"consecutive_5xx": 1, "consecutive_gateway": 0}, ejections
        active = builtin_samples(web, "tessera_sidecar_outlier_ejections_active", USERS_CLUSTER)
        assert active == {"": 1}, active
    # The health check (an hour apart) has not noticed: only outlier detection explains it.
    assert any(i["address"] == users[0].address and i["health"] == "healthy"
               for i in instances(domain))  # fmt: skip

    stop(web, *users)


# -- authorization -----------------------------------------------------------------------------


@supported_by("envoy", "builtin", case="a caller no policy allows gets 403; the log names the rule")
def test_a_caller_no_policy_allows_gets_403_and_the_log_says_which_rule(
    plane: str, domain: TrustDomain, start: ProxyStarter, apps: Apps,
    callers: dict[str, WorkloadApiX509Source],
) -> None:  # fmt: skip
    users = start.sidecar(f"authz-users-{plane}", "users-service", USERS, apps["users"],
                          "app=users", plane=plane)  # fmt: skip
    users.wait_ready()
    url = f"https://{users.address}/api/users"
    with httpx_client(callers[WEB], authorize_id(USERS), timeout=10) as client:
        assert client.get(url).status_code == 200
        denied = client.delete(f"https://{users.address}/admin")  # a DENY rule's
    with httpx_client(callers[INTRUDER], authorize_id(USERS), timeout=10) as client:
        refused = client.get(url)  # no ALLOW rule's
    assert denied.status_code == 403, denied.text
    assert refused.status_code == 403, refused.text
    assert apps["users"].served == 1  # the intruder's request never reached the app

    if plane == "builtin":
        assert refused.text.startswith(
            f"{INTRUDER} refused by policy rule 'AuthorizationPolicy users-allow-web': "
        )
        assert denied.text.startswith(
            f"{WEB} refused by policy rule 'AuthorizationPolicy users-no-admin spec.rules[0]': "
        )
        stop(users)
        return

    # Through Envoy on both sides: the intruder's own sidecar, its outbound by Host.
    intruder = start.sidecar(
        f"authz-intruder-{plane}",
        "intruder-service",
        INTRUDER,
        apps["intruder"],
        "app=intruder",
        outbound=True,
        plane=plane,
    )
    intruder.wait_ready()

    def routed() -> httpx.Response | None:
        answer = outbound_get(intruder, "/api/orders", "users-service")
        return answer if answer.status_code != 503 else None  # 503: no endpoint yet

    through = poll(routed, DEADLINE, "the intruder's Envoy routing to users-service")
    assert through.status_code == 403, through.text
    assert apps["users"].served == 1

    def refusals() -> list[dict[str, Any]] | None:
        found = [line for line in users.access_log("inbound") if line["response_code"] == 403]
        return found if len(found) == 3 else None

    logged = users.process.wait_until(refusals, "three 403s in the inbound's access log", DEADLINE)
    # RBAC's reason: the DENY rule that matched, by its source (Envoy writes its spaces as
    # underscores); "none" when no ALLOW rule matched.
    assert sorted((line["source"], line["path"], line["response_code_details"])
                  for line in logged) == [
        (INTRUDER, "/api/orders", "rbac_access_denied_matched_policy[none]"),
        (INTRUDER, "/api/users", "rbac_access_denied_matched_policy[none]"),
        (WEB, "/admin", "rbac_access_denied_matched_policy"
         "[AuthorizationPolicy_users-no-admin_spec.rules[0]]"),
    ]  # fmt: skip
    assert all(line["upstream_host"] in (None, "-", "") for line in logged), logged
    outbound = [
        line
        for line in intruder.access_log("outbound")
        if line["path"] == "/api/orders" and line["response_code"] == 403
    ]
    assert outbound and outbound[-1]["upstream_peer"] == USERS, outbound
    stop(users, intruder)


# -- rotation under load -----------------------------------------------------------------------


def presented_serial(source: WorkloadApiX509Source, port: int) -> int:
    """The serial number of the SVID the inbound at ``port`` presents on a new handshake."""
    context = mtls_client_context(source, authorize_id(ORDERS))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="orders-service") as tls:  # fmt: skip
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def ask(conn: http.client.HTTPConnection, headers: dict[str, str]) -> int:
    """GET /api/orders on ``conn`` (kept alive); the status."""
    conn.request("GET", "/api/orders", headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status


@supported_by("envoy", "builtin", case="SVIDs rotate under load and no request fails")
def test_svids_rotate_under_load_and_no_request_fails(
    plane: str, start: ProxyStarter, apps: Apps,
    callers: dict[str, WorkloadApiX509Source],
) -> None:  # fmt: skip
    orders = start.sidecar(f"rotation-orders-{plane}", "orders-service", ORDERS, apps["orders"],
                           "app=orders", plane=plane)  # fmt: skip
    orders.wait_ready()
    started = [orders]
    inbound = orders.ports["inbound"]
    if plane == "envoy":  # an Envoy pair: reports' outbound -> orders' inbound
        reports = start.sidecar(
            f"rotation-reports-{plane}",
            "reports-service",
            REPORTS,
            apps["reports"],
            "app=reports",
            outbound=True,
            plane=plane,
        )
        reports.wait_ready()
        started.append(reports)
        poll(lambda: outbound_get(reports, "/", "orders-service").status_code == 200 or None,
             DEADLINE, "reports' Envoy routing to orders-service")  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", reports.ports["outbound"], timeout=10)
        headers = {"Host": "orders-service"}
    else:  # the built-in inbound, called directly over mTLS
        context = mtls_client_context(callers[REPORTS], authorize_id(ORDERS))
        conn = http.client.HTTPSConnection("127.0.0.1", inbound, context=context, timeout=10)
        headers = {}

    def upstream_connections() -> float:
        return envoy_samples(reports, "envoy_cluster_upstream_cx_total", ORDERS_CLUSTER)

    answers: list[int] = []
    sockets: list[socket.socket | None] = []
    try:
        ask(conn, headers)  # the connections the load keeps: opened before it
        connections_before = upstream_connections() if plane == "envoy" else 0.0
        serials = [presented_serial(callers[REPORTS], inbound)]

        def rotated_twice() -> bool | None:
            for _ in range(10):
                answers.append(ask(conn, headers))
                if not any(conn.sock is seen for seen in sockets):
                    sockets.append(conn.sock)
            serial = presented_serial(callers[REPORTS], inbound)
            if serial != serials[-1]:
                serials.append(serial)
            return len(serials) > 3 or None  # three rotations seen: more than two lived through

        poll(rotated_twice, 6 * SVID_TTL, "the inbound presenting three new SVIDs")
    finally:
        conn.close()
    assert set(answers) == {200}, [status for status in answers if status != 200][:5]
    assert len(sockets) == 1  # one kept-alive connection throughout
    assert len(answers) >= 40
    if plane == "envoy":  # Envoy's own connection to the inbound lived through them too
        assert upstream_connections() == connections_before
    stop(*started)
