"""The web console in a real browser (Debian's headless Chromium through chromedriver),
over a real mesh: a server, an agent, two Services with built-in sidecars calling each
other (users-service has a second instance behind an Envoy sidecar), and Debian's
Prometheus scraping them all. The Grafana dashboard in docs/ is checked against what
that Prometheus holds.

A person opens the token URL, sees the active authority and the agent, watches the
edge between the two Services appear on the topology graph with a rate as traffic
flows (without reloading: the page updates itself), asks the explain form why a caller
is refused, and is refused without the token. Each page is saved as a screenshot in
:data:`SCREENSHOTS` (``make test`` prints where).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import missing_service
from tests.integration.conftest import tessera
from tests.integration.console_fixtures import (  # registers start_console
    ConsoleProcess,
    start_console_fixture,  # noqa: F401
)
from tests.integration.mesh_fixtures import App, Proxy, ProxyStarter, healthy
from tests.integration.prometheus_fixtures import Prometheus, Target, start_prometheus
from tests.integration.sidecar_fixtures import Entry, TrustDomain, processes, trust_domain
from tests.support.processes import poll

pytestmark = [pytest.mark.integration, pytest.mark.envoy]

SCREENSHOTS = Path(os.environ.get("TESSERA_SCREENSHOTS") or
                   Path(__file__).resolve().parents[2] / "build" / "console-screenshots")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DEADLINE = 60.0

USERS = "spiffe://example.org/users"
WEB = "spiffe://example.org/web"
INTRUDER = "spiffe://example.org/intruder"

MESH = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users-service}}
spec:
  spiffeIds: [{USERS}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  healthCheck: {{http: {{path: /healthz}}, interval: 1s}}
---
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: web-service}}
spec:
  spiffeIds: [{WEB}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-intruder}}
spec:
  selector: {{matchLabels: {{app: users}}}}
  action: DENY
  rules:
  - from:
    - source: {{principals: [{INTRUDER}]}}
"""


@dataclass
class Mesh:
    domain: TrustDomain
    users: Proxy
    web: Proxy
    envoy: Proxy
    prometheus: Prometheus


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    directory = tmp_path_factory.mktemp("console-browser")
    with trust_domain(directory, [Entry(USERS), Entry(WEB)]) as domain, processes() as begin:
        tessera("mesh", "apply", "-f", "-", "--data-dir", str(domain.server.data_dir),
                input=MESH)  # fmt: skip
        start = ProxyStarter(domain, begin, directory)
        users_app, web_app = App.serving("users-1"), App.serving("web-1")
        second_app = App.serving("users-2")
        try:
            users = start.sidecar("users-1", "users-service", USERS, users_app, "app=users",
                                  plane="builtin")  # fmt: skip
            envoy = start.sidecar("users-2", "users-service", USERS, second_app, "app=users",
                                  plane="envoy")  # fmt: skip
            web = start.sidecar("web-1", "web-service", WEB, web_app, "app=web",
                                outbound=True, plane="builtin")  # fmt: skip
            for proxy in (users, envoy, web):
                proxy.wait_ready()
            healthy(domain, users.address)
            healthy(domain, envoy.address)
            targets = [
                Target.server(domain.server, directory / "bundle.pem"),
                Target("agent", f"127.0.0.1:{domain.agent.health_port}"),
                Target("sidecar", f"127.0.0.1:{users.health}"),
                Target("sidecar", f"127.0.0.1:{web.health}"),
                Target("sidecar-envoy", f"127.0.0.1:{envoy.health}"),
            ]
            with start_prometheus(directory / "prometheus", targets) as prometheus:
                prometheus.wait_for_targets()
                yield Mesh(domain, users, web, envoy, prometheus)
        finally:
            users_app.stop()
            web_app.stop()
            second_app.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None or shutil.which(CHROMEDRIVER) is None:
        missing_service("needs Debian's chromium and chromium-driver "
                        "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


class Traffic:
    """web-service's app calling users-service through web's sidecar, until stopped."""

    def __init__(self, web: Proxy) -> None:
        self._url = f"http://127.0.0.1:{web.ports['outbound']}/api/users"
        self._stop = threading.Event()
        self.answered = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(headers={"Host": "users-service"}, timeout=5) as client:
            while not self._stop.is_set():
                if client.get(self._url).status_code == 200:
                    self.answered += 1
                self._stop.wait(0.02)  # a steady trickle, not a load test


def shot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def text_of(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def wait_for(driver: Any, css: str, what: str, deadline: float = DEADLINE) -> Any:
    from selenium.common.exceptions import NoSuchElementException
    from selenium.webdriver.common.by import By

    def found() -> Any:
        try:
            return driver.find_element(By.CSS_SELECTOR, css)
        except NoSuchElementException:
            return None

    return poll(found, deadline, what)


def test_a_person_signs_in_reads_the_trust_domain_watches_traffic_and_asks_why(
    mesh: Mesh, browser: Any, start_console: Any
) -> None:
    from selenium.webdriver.common.by import By

    console: ConsoleProcess = start_console(mesh.domain.server, "--prometheus",
                                            mesh.prometheus.url, "--rate-window", "30s")
    # Without the token: refused, saying what to open.
    browser.get(console.base + "/trust-domain")
    assert "needs its one-time token" in text_of(browser, "#refused-reason")
    shot(browser, "refused")

    # The token URL signs in and lands on the trust domain, the token gone from the address.
    browser.get(console.url)
    assert browser.current_url == console.base + "/trust-domain"
    admin = mesh.domain.admin()
    active = next(a for a in admin.get("/v1/localauthority/x509")["authorities"]
                  if a["status"] == "active")
    rows = browser.find_elements(By.CSS_SELECTOR, "#authorities-x509 tr.authority.active")
    assert [row.find_element(By.TAG_NAME, "code").text for row in rows] == [
        active["authority_id"]]
    shot(browser, "trust-domain")

    browser.get(console.base + "/agents")
    agent_id = admin.get("/v1/agents")["agents"][0]["spiffe_id"]
    assert agent_id in text_of(browser, "#agents")
    assert text_of(browser, "#agents tr.agent .pill") == "active"
    shot(browser, "agents")

    browser.get(console.base + "/entries")
    assert USERS in text_of(browser, "#entries")
    shot(browser, "entries")
    browser.get(console.base + "/svids?within=7d")
    shot(browser, "svids")
    browser.get(console.base + "/audit")
    status = wait_for(browser, "#chain-status", "the audit chain's status", 20)
    assert "Hash chain intact" in status.text
    shot(browser, "audit")

    # Traffic between the two Services: the edge appears on the open page by itself.
    browser.get(console.base + "/mesh")
    edge_css = 'g.edge[data-source="web-service"][data-destination="users-service"]'
    assert not browser.find_elements(By.CSS_SELECTOR, edge_css)
    with Traffic(mesh.web) as traffic:
        edge = wait_for(browser, edge_css, "the web → users edge on the topology graph")
        assert float(edge.get_attribute("data-rate")) > 0
        assert "req/s" in edge.text
        assert traffic.answered > 0
        assert browser.execute_script("return document.body.dataset.updated") is not None
        shot(browser, "mesh")
    browser.get(console.base + "/mesh/services/users-service")
    assert "deny-intruder" in text_of(browser, "#describe")
    shot(browser, "service")

    # Why is the intruder refused? The form names the rule.
    browser.get(console.base + "/explain")
    browser.find_element(By.ID, "explain-from").send_keys(INTRUDER)
    browser.find_element(By.ID, "explain-to").send_keys("users-service")
    browser.find_element(By.ID, "explain-submit").click()
    rule = wait_for(browser, "#deciding-rule", "the explanation's deciding rule", 20)
    assert rule.text == "AuthorizationPolicy deny-intruder"
    assert text_of(browser, "#verdict").startswith("Refused by")
    shot(browser, "explain")


def test_prometheus_has_the_request_rate_between_the_two_services(mesh: Mesh) -> None:
    with Traffic(mesh.web):
        rate = poll(lambda: (samples[0][1] if (samples := mesh.prometheus.query(
            f'sum(rate(tessera_sidecar_requests_total{{listener="inbound",source="{WEB}",'
            'destination="users-service"}[30s]))')) and samples[0][1] > 0 else None),
            DEADLINE, "a request rate from web-service to users-service in Prometheus")
    assert rate > 0


DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "tessera-dashboard.json"
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}


def queried_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    keywords, or the label names of matchers and of by/without/on lists."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", text)
    return {n for n in names if n.lower() not in _NOT_METRICS and not n.startswith("$")}


def test_the_dashboard_reads_only_metrics_the_running_processes_export(mesh: Mesh) -> None:
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"]
               for target in panel.get("targets", [])]
    assert len(queries) >= 25
    names = set().union(*(queried_metrics(q) for q in queries))
    assert {"tessera_server_svids_issued_total", "tessera_agent_sync_lag_seconds",
            "tessera_sidecar_request_duration_seconds_bucket",
            "envoy_cluster_upstream_rq_xx"} <= names
    with Traffic(mesh.web):  # through both instances of users-service: both planes count
        def missing() -> set[str] | None:
            absent = {name for name in names
                      if not mesh.prometheus.query(f'count({{__name__="{name}"}})')}
            return absent or None

        try:
            poll(lambda: None if missing() else True, DEADLINE,
                 "every metric the dashboard queries, scraped by Prometheus")
        except AssertionError as err:
            raise AssertionError(f"not exported by any process: {sorted(missing() or ())}"
                                 ) from err


def test_the_metric_names_of_a_query_are_found() -> None:
    assert queried_metrics(
        'histogram_quantile(0.99, sum by (destination, le) (rate('
        'tessera_sidecar_request_duration_seconds_bucket{listener="inbound",code=~"5.."}'
        '[$__rate_interval]))) / on (instance) group_left up') == {
        "tessera_sidecar_request_duration_seconds_bucket", "up"}
    assert queried_metrics("(min(a_seconds) - time()) / 3600") == {"a_seconds"}
