"""Per-request telemetry of the built-in proxy, through a real ``tessera sidecar run --proxy
builtin`` in front of a small app: its access log on stdout, its /metrics, the caller's
trace continued to the app, and a span at a test collector (``OTEL_EXPORTER_OTLP_ENDPOINT``).

    users      users-service's instance; AuthorizationPolicy: only web may call it
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from spiffe import SpiffeId

from sdk import WorkloadApiX509Source, authorize_id
from sdk.integrations.httpx import httpx_client
from sdk.sidecar.connect import connect_x509_source
from tests.integration.conftest import tessera
from tests.integration.mesh_fixtures import DEADLINE, App, Proxy, ProxyStarter, healthy
from tests.integration.sidecar_fixtures import Entry, TrustDomain, processes, trust_domain
from tests.support.otlp_collector import OtlpCollector
from tests.support.processes import poll

pytestmark = pytest.mark.integration

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
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: users-allow-web}}
spec:
  selector: {{matchLabels: {{app: users}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: [{WEB}]}}
"""


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    with OtlpCollector.start() as running:
        yield running


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    with trust_domain(tmp_path_factory.mktemp("builtin-telemetry"),
                      [Entry(USERS), Entry(WEB), Entry(INTRUDER)]) as running:  # fmt: skip
        tessera("mesh", "apply", "-f", "-", "--data-dir", str(running.server.data_dir),
                input=MESH)  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    running = App.serving("users-1")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def users(
    domain: TrustDomain, app: App, collector: OtlpCollector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Proxy]:  # fmt: skip
    with processes() as begin, pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        start = ProxyStarter(domain, begin, tmp_path_factory.mktemp("builtin-telemetry-proxies"))
        sidecar = start.sidecar("users-1", "users-service", USERS, app, "app=users",
                                plane="builtin")  # fmt: skip
        patch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
        sidecar.wait_ready()
        healthy(domain, sidecar.address)
        yield sidecar


@pytest.fixture(scope="module")
def callers(domain: TrustDomain) -> Iterator[dict[str, WorkloadApiX509Source]]:
    sources = {spiffe_id: connect_x509_source(domain.endpoint, spiffe_id=SpiffeId(spiffe_id))
               for spiffe_id in (WEB, INTRUDER)}  # fmt: skip
    yield sources
    for source in sources.values():
        source.close()


def _get(source: WorkloadApiX509Source, users: Proxy, path: str,
         **headers: str) -> httpx.Response:  # fmt: skip
    with httpx_client(source, authorize_id(USERS), timeout=10) as client:
        return client.get(f"https://{users.address}{path}", headers=headers)


def _samples(users: Proxy, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(users.get("/metrics").text)
            for sample in family.samples if sample.name == name]  # fmt: skip


def test_requests_are_logged_counted_and_traced_to_the_collector(
    users: Proxy, callers: dict[str, WorkloadApiX509Source], collector: OtlpCollector
) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    response = _get(callers[WEB], users, "/api/v1/users?token=secret",
                    traceparent=f"00-{trace_id}-{parent}-01")  # fmt: skip
    assert response.status_code == 200, response.text
    # The app got the caller's trace, with the sidecar's span as the parent.
    passed_on = response.json()["traceparent"]
    version, at_app, span_id, flags = passed_on.split("-")
    assert (version, at_app, flags) == ("00", trace_id, "01") and span_id != parent

    # A request without a traceparent: the app gets a new trace's.
    fresh = _get(callers[WEB], users, "/api/v1/users").json()["traceparent"]
    assert fresh.split("-")[1] != trace_id
    refused = _get(callers[INTRUDER], users, "/api/v1/users")
    assert refused.status_code == 403, refused.text

    span = collector.wait_for_span(lambda span: span.trace_id == trace_id,
                                   "the sidecar's span of the request, in the caller's trace")
    assert (span.service_name, span.span_id, span.parent_span_id) == (
        "users-service", span_id, parent)  # fmt: skip
    assert span.attributes["http.status_code"] == 200
    assert span.attributes["http.method"] == "GET"
    assert span.attributes["peer.spiffe_id"] == WEB

    lines = poll(lambda: found if len(found := users.access_log("inbound")) >= 3 else None,
                 DEADLINE, "three access log lines on the sidecar's stdout")  # fmt: skip
    traced = next(line for line in lines if line["trace_id"] == trace_id)
    assert traced["source"] == WEB and traced["response_code"] == 200
    assert traced["path"] == "/api/v1/users"  # without the query
    assert traced["upstream_host"] == users_app_address(users)
    assert traced["response_code_details"] == "via_upstream"
    assert isinstance(traced["duration_ms"], int) and traced["bytes_sent"] > 0
    denied = next(line for line in lines if line["source"] == INTRUDER)
    assert denied["response_code"] == 403
    assert denied["response_code_details"] == (
        "rbac_access_denied_matched_policy[AuthorizationPolicy users-allow-web]")
    assert denied["upstream_host"] is None

    edge = {"listener": "inbound", "source": WEB, "destination": "users-service",
            "route": "none", "code_class": "2xx", "code": "200"}  # fmt: skip
    counted = _samples(users, "tessera_sidecar_requests_total")
    assert (edge, 2.0) in counted
    assert ({**edge, "source": INTRUDER, "code_class": "4xx", "code": "403"}, 1.0) in counted
    timed = _samples(users, "tessera_sidecar_request_duration_seconds_count")
    assert ({k: v for k, v in edge.items() if k != "code"}, 2.0) in timed


def users_app_address(users: Proxy) -> str:
    """The app's address, as the sidecar was started with it (``--app``)."""
    args = users.process.popen.args
    assert isinstance(args, list)
    return str(args[args.index("--app") + 1])
