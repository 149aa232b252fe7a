"""The mesh's scenarios, routing part: a weighted split, retries, a timeout and a rate limit
between services, each through real sidecars configured by the agent.

One trust domain for the module, its Services applied once; each case starts the
instances of its own Service on the plane it tests (stopped when it ends), applies its
own VirtualService, DestinationRule or RateLimit and deletes them when it ends. Callers
go through a sidecar's (Envoy's or the built-in proxy's) ``--outbound`` listener
(``Host: split-service``) on one keep-alive connection:

    web       the caller of every case (spiffe://example.org/web)
    reports   a second caller, which the rate limit does not name

A VirtualService of a case sets a response header (``x-scenario``) so the case knows
the caller's Envoy has its routes before it counts anything.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import tessera
from tests.integration.mesh_fixtures import (
    DEADLINE,
    App,
    Proxy,
    ProxyStarter,
    healthy,
    mesh,
    supported_by,
)
from tests.integration.sidecar_fixtures import Entry, TrustDomain, processes, trust_domain
from tests.support.processes import poll

pytestmark = [pytest.mark.integration, pytest.mark.envoy]

WEB = "spiffe://example.org/web"
REPORTS = "spiffe://example.org/reports"
SPLIT = "spiffe://example.org/split"
FLAKY = "spiffe://example.org/flaky"
SLOW = "spiffe://example.org/slow"
LIMITED = "spiffe://example.org/limited"

CALLERS = {WEB: "web-service", REPORTS: "reports-service"}
SERVICES = {**CALLERS, SPLIT: "split-service", FLAKY: "flaky-service", SLOW: "slow-service",
            LIMITED: "limited-service"}  # fmt: skip
MARKER = "x-scenario"


def _service(spiffe_id: str, name: str) -> str:
    return f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: {name}}}
spec:
  spiffeIds: [{spiffe_id}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  healthCheck: {{http: {{path: /healthz}}, interval: 1s}}
"""


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    entries = [Entry(spiffe_id) for spiffe_id in SERVICES]
    with trust_domain(tmp_path_factory.mktemp("mesh-routing"), entries) as running:
        tessera("mesh", "apply", "-f", "-", "--data-dir", str(running.server.data_dir),
                input="---\n".join(_service(*item) for item in SERVICES.items()))  # fmt: skip
        yield running


class Scenario:
    """The module's running pieces: starts callers (once each) and a case's instances."""

    def __init__(self, domain: TrustDomain, start: ProxyStarter) -> None:
        self.domain = domain
        self.start = start
        self.apps: list[App] = []
        self._callers: dict[str, Proxy] = {}
        self._instances: list[Proxy] = []

    def caller(self, plane: str, spiffe_id: str) -> Proxy:
        """A sidecar of ``spiffe_id``'s Service with an ``--outbound`` listener, ready
        (on ``plane``; the Envoy ones are kept for the module)."""
        if plane == "envoy" and spiffe_id in self._callers:
            return self._callers[spiffe_id]
        name = CALLERS[spiffe_id].removesuffix("-service")
        app = self.app(name)
        proxy = self.start.sidecar(f"{name}-{plane}", CALLERS[spiffe_id], spiffe_id, app,
                                   f"app={name}", outbound=True, plane=plane)  # fmt: skip
        proxy.wait_ready()
        if plane == "envoy":
            self._callers[spiffe_id] = proxy
        return proxy

    def app(self, name: str) -> App:
        app = App.serving(name)
        self.apps.append(app)
        return app

    def instances(
        self, plane: str, spiffe_id: str, *instances: tuple[str, ...]
    ) -> dict[str, App]:
        """Start an app and its sidecar (on ``plane``) per ``(name, label, ...)`` as
        instances of ``spiffe_id``'s Service, all at once; return the apps once all are
        healthy. They stop when the case ends (:meth:`stop_instances`)."""
        started = []
        for name, *labels in instances:
            app = self.app(name)
            proxy = self.start.sidecar(f"{name}-{plane}", SERVICES[spiffe_id], spiffe_id, app,
                                       *labels, plane=plane)  # fmt: skip
            self._instances.append(proxy)
            started.append((app, proxy))
        for _, proxy in started:
            proxy.wait_ready()
            healthy(self.domain, proxy.address)
        return {app.name: app for app, _ in started}


    def stop_instances(self) -> None:
        """Stop the instances of the case that ended (each deregisters as it stops)."""
        for proxy in self._instances:
            proxy.process.send_signal(signal.SIGTERM)
        for proxy in self._instances:
            proxy.process.wait(timeout=DEADLINE)
        self._instances.clear()


@pytest.fixture(scope="module")
def scenario(domain: TrustDomain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    with processes() as begin:
        running = Scenario(domain, ProxyStarter(domain, begin, tmp_path_factory.mktemp("proxies")))
        try:
            yield running
        finally:
            for app in running.apps:
                app.stop()


@pytest.fixture(autouse=True)
def _instances_stopped(scenario: Scenario) -> Iterator[None]:
    """A case's instances serve that case only: the next one's callers never reach them."""
    yield
    scenario.stop_instances()


@contextlib.contextmanager
def applied(domain: TrustDomain, documents: str) -> Iterator[None]:
    """``tessera mesh apply`` the documents; ``tessera mesh delete`` them after, in
    reverse order (a VirtualService before the DestinationRule whose subsets it names)."""
    mesh(domain, "apply", "-f", "-", stdin=documents)
    try:
        yield
    finally:
        for document in reversed(list(yaml.safe_load_all(documents))):
            mesh(domain, "delete", document["kind"].lower(), document["metadata"]["name"])


@contextlib.contextmanager
def outbound(caller: Proxy, host: str) -> Iterator[httpx.Client]:
    """One keep-alive connection to the caller's outbound listener, asking for ``host``."""
    with httpx.Client(base_url=f"http://127.0.0.1:{caller.ports['outbound']}",
                      headers={"Host": host}, timeout=10) as client:  # fmt: skip
        yield client


def routed(client: httpx.Client, marker: str, *, app: str | None = None) -> None:
    """Ask until an answer carries the VirtualService's ``marker`` (its routes reached the
    caller's Envoy), and comes from ``app`` when given."""

    def answer() -> bool | None:
        response = client.get("/")
        if response.headers.get(MARKER) != marker:
            return None
        return app is None or response.json()["app"] == app or None

    poll(answer, DEADLINE, f"an answer with {MARKER}: {marker}" + (f" from {app}" if app else ""))


def answering(client: httpx.Client, status: int, what: str) -> float:
    """Ask until an answer has ``status``; when (``time.monotonic()``) that request was sent."""

    def answer() -> float | None:
        sent = time.monotonic()
        return sent if client.get("/").status_code == status else None

    return poll(answer, DEADLINE, what)


def _virtual_service(name: str, host: str, marker: str, http: str) -> str:
    """A VirtualService for ``host`` whose one route answers with ``marker``; ``http`` is
    the rest of that route, indented under it."""
    return f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [{host}]
  http:
  - headers: {{response: {{set: {{{MARKER}: {marker}}}}}}}
{http}"""


SPLIT_RULES = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: split-versions}
spec:
  host: split-service
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
""" + _virtual_service("split-90-10", "split-service", "split", """\
    route:
    - destination: {host: split-service, subset: v1}
      weight: 90
    - destination: {host: split-service, subset: v2}
      weight: 10
""")  # fmt: skip


@supported_by("envoy", "builtin", case="a 90/10 split within ±4% over 1,000 requests")
def test_a_90_10_split_sends_nine_requests_in_ten_to_v1(plane: str, scenario: Scenario) -> None:
    web = scenario.caller(plane, WEB)
    scenario.instances(plane, SPLIT, ("split-v1", "app=split", "version=v1"),
                       ("split-v2", "app=split", "version=v2"))  # fmt: skip
    with applied(scenario.domain, SPLIT_RULES), outbound(web, "split-service") as client:
        for version in ("split-v1", "split-v2"):  # both subsets have their instance
            routed(client, "split", app=version)
        answers = [client.get("/") for _ in range(1000)]
    assert Counter(answer.status_code for answer in answers) == {200: 1000}
    reached = Counter(answer.json()["app"] for answer in answers)
    # Envoy picks a weighted cluster at random per request: over 1000 requests at 90%,
    # one standard deviation is 0.95%, so ±4% is more than 4 of them.
    assert 860 <= reached["split-v1"] <= 940, reached
    assert reached["split-v1"] + reached["split-v2"] == 1000, reached


def _flaky_rules(marker: str, retries: str) -> str:
    return _virtual_service("flaky-retries", "flaky-service", marker, f"""\
    retries: {retries}
    route:
    - destination: {{host: flaky-service}}
""")  # fmt: skip


@supported_by("envoy", "builtin", case="retries: a flaky instance answers every request")
def test_retries_make_an_instance_failing_every_other_request_always_answer(
    plane: str, scenario: Scenario
) -> None:
    web = scenario.caller(plane, WEB)
    flaky = scenario.instances(plane, FLAKY, ("flaky-1", "app=flaky"))["flaky-1"]
    flaky.behaviour.fail_every = 2  # every other request: 503
    with outbound(web, "flaky-service") as client:
        # Without retries (Tessera's default retries 503 twice), every other GET fails.
        with applied(scenario.domain, _flaky_rules("no-retries", "{attempts: 0}")):
            routed(client, "no-retries")
            statuses = [client.get("/").status_code for _ in range(20)]
        assert Counter(statuses) == {200: 10, 503: 10}, statuses

        with applied(scenario.domain, _flaky_rules("retries", "{attempts: 3, retryOn: 5xx}")):
            routed(client, "retries")
            before = flaky.served
            statuses = [client.get("/").status_code for _ in range(50)]
            served = flaky.served - before
    assert Counter(statuses) == {200: 50}, statuses
    # Each failed attempt was retried once: 49 or 50 of the 50 (by where the count stood).
    assert served in (99, 100), served


SLOW_RULES = _virtual_service("slow-timeout", "slow-service", "timeout", """\
    timeout: 1s
    route:
    - destination: {host: slow-service}
""")  # fmt: skip


@supported_by("envoy", "builtin", case="a route timeout answers 504 before a slow app does")
def test_a_route_timeout_answers_504_before_a_slow_app_does(plane: str, scenario: Scenario) -> None:
    web = scenario.caller(plane, WEB)
    slow = scenario.instances(plane, SLOW, ("slow-1", "app=slow"))["slow-1"]
    with applied(scenario.domain, SLOW_RULES), outbound(web, "slow-service") as client:
        routed(client, "timeout")
        slow.behaviour.delay = 10.0
        # The client waits 5 s, the app 10 s: only the route's 1 s timeout answers in time.
        answer = client.get("/", timeout=5)
    assert answer.status_code == 504, answer.text
    assert answer.text == "upstream request timeout"


RATE_LIMIT = f"""\
apiVersion: tessera.io/v1alpha1
kind: RateLimit
metadata: {{name: web-to-limited}}
spec:
  service: limited-service
  from: {{principals: [{WEB}]}}
  requestsPerSecond: 1
  burst: 3
"""


@supported_by("envoy", "builtin", case="a RateLimit answers 429 to the caller it names, only")
def test_a_rate_limit_answers_429_to_the_caller_it_names_only(
    plane: str, scenario: Scenario
) -> None:
    web, reports = scenario.caller(plane, WEB), scenario.caller(plane, REPORTS)
    scenario.instances(plane, LIMITED, ("limited-1", "app=limited"))
    with outbound(web, "limited-service") as limited, \
            outbound(reports, "limited-service") as other:  # fmt: skip
        for client in (limited, other):  # both reach the instance before any limit
            answering(client, 200, "limited-service answering through the caller's sidecar")
        with applied(scenario.domain, RATE_LIMIT):
            began = answering(limited, 429, "web's calls limited with 429")
            answers: dict[str, list[Any]] = {"web": [], "reports": []}
            for _ in range(10):
                answers["web"].append(limited.get("/").status_code)
                answer = other.get("/")
                caller = answer.json()["caller"] if answer.status_code == 200 else answer.text
                answers["reports"].append((answer.status_code, caller))
            elapsed = time.monotonic() - began
        assert answers["reports"] == [(200, [REPORTS])] * 10, answers
        # Its bucket was empty at the 429 and refills one token a second: since then, at
        # most one more request per whole second that passed, and one, got through.
        assert answers["web"].count(200) <= int(elapsed) + 1, (answers, elapsed)
        assert set(answers["web"]) <= {200, 429}, answers
        # The limit deleted, web's calls pass again.
        answering(limited, 200, "web's calls answered 200 once the RateLimit is deleted")
