"""JWT-SVIDs at the gateway and per-request telemetry, through real Envoys: a server and an
agent (``otlp_endpoint`` set, by its ``TESSERA_OTLP_ENDPOINT``), ``tessera gateway run`` and
``tessera sidecar run --proxy envoy`` in front of a small app, a test collector receiving
the spans over OTLP.

    gateway    RequestAuthentication: the trust domain's JWT-SVIDs, audience "edge";
               AuthorizationPolicy: only a request whose token's sub is of the trust domain
    users      users-service's instance (any caller in the mesh)
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import WorkloadApiClient

from tests.integration.conftest import free_port, tessera
from tests.integration.mesh_fixtures import DEADLINE, App, Proxy, ProxyStarter, healthy
from tests.integration.sidecar_fixtures import Entry, TrustDomain, processes, trust_domain
from tests.support.otlp_collector import OtlpCollector
from tests.support.processes import poll
from tests.unit.mesh.documents import MISSION

pytestmark = [pytest.mark.integration, pytest.mark.envoy]

USERS = "spiffe://example.org/users"
GATEWAY = "spiffe://example.org/gateway"
AUDIENCE = "edge"
ROTATION_DEADLINE = 30.0
"""The agent learns of a new JWT key at its next sync; the gateway gets it on the push."""

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
kind: RequestAuthentication
metadata: {{name: edge-jwt}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  jwtRules:
  - issuer: spiffe://example.org
    audiences: [{AUDIENCE}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: edge-requires-jwt}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  action: ALLOW
  rules:
  - when:
    - key: request.auth.claims[sub]
      values: ["spiffe://example.org/*"]
"""


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    with OtlpCollector.start() as running:
        yield running


@pytest.fixture(scope="module")
def domain(
    tmp_path_factory: pytest.TempPathFactory, collector: OtlpCollector
) -> Iterator[TrustDomain]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TESSERA_OTLP_ENDPOINT", collector.endpoint)  # the agent's setting
        with trust_domain(tmp_path_factory.mktemp("telemetry"),
                          [Entry(USERS), Entry(GATEWAY)]) as running:  # fmt: skip
            patch.delenv("TESSERA_OTLP_ENDPOINT")
            tessera("mesh", "apply", "-f", "-", "--data-dir", str(running.server.data_dir),
                    input=MESH + "---\n" + MISSION)  # fmt: skip
            yield running


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    running = App.serving("users-1")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def gateway(
    domain: TrustDomain, app: App, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Proxy, Proxy]]:
    with processes() as begin:
        start = ProxyStarter(domain, begin, tmp_path_factory.mktemp("telemetry-proxies"))
        users = start.sidecar("users-1", "users-service", USERS, app, "app=users")
        users.wait_ready()
        healthy(domain, users.address)
        gateway = start.gateway("gateway", GATEWAY, offset=free_port() - 80)
        gateway.wait_ready()
        yield gateway, users


def _get(gateway: Proxy, token: str | None = None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(f"http://127.0.0.1:{gateway.ports['http']}/api/v1/users",
                     headers=headers, timeout=10)  # fmt: skip


def _jwt_svid(domain: TrustDomain, *audiences: str) -> str:
    with WorkloadApiClient(socket_path=domain.endpoint, default_timeout=10) as client:
        return str(client.fetch_jwt_svid(audience=set(audiences)).token)


def _forged(domain: TrustDomain) -> str:
    """A token just like a JWT-SVID, with the real key id, signed by another key."""
    real = _jwt_svid(domain, AUDIENCE)
    header = jwt.get_unverified_header(real)
    claims = jwt.decode(real, options={"verify_signature": False})
    return jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                      headers={"kid": header["kid"], "typ": "JWT"})  # fmt: skip


def test_the_gateway_accepts_the_trust_domains_jwt_svids_only(
    domain: TrustDomain, gateway: tuple[Proxy, Proxy]
) -> None:
    edge, _ = gateway
    poll(lambda: _get(edge).status_code == 403 or None, DEADLINE,
         "the gateway refusing a request without a token")  # fmt: skip
    accepted = _get(edge, _jwt_svid(domain, AUDIENCE))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["app"] == "users-1"
    assert _get(edge, _forged(domain)).status_code == 401
    # A JWT-SVID for another audience: refused by the JWT filter itself (Envoy's 403).
    other = _get(edge, _jwt_svid(domain, "another-audience"))
    assert other.status_code == 403
    poll(lambda: any(entry["response_code_details"]
                     == "jwt_authn_access_denied{Audiences_in_Jwt_are_not_allowed}"
                     for entry in edge.access_log("gateway_80")) or None,
         DEADLINE, "the JWT filter's refusal in the access log")  # fmt: skip


def test_a_new_jwt_key_reaches_the_gateway(
    domain: TrustDomain, gateway: tuple[Proxy, Proxy]
) -> None:
    edge, _ = gateway
    old = jwt.get_unverified_header(_jwt_svid(domain, AUDIENCE))["kid"]
    domain.server.cli("localauthority", "jwt", "prepare")
    domain.server.cli("localauthority", "jwt", "activate")

    def signed_by_the_new_key() -> str | None:
        # Another audience set: a token minted now, not the one the agent cached.
        token = _jwt_svid(domain, AUDIENCE, f"rotation-{secrets.token_hex(4)}")
        return token if jwt.get_unverified_header(token)["kid"] != old else None

    token = poll(signed_by_the_new_key, ROTATION_DEADLINE, "a JWT-SVID signed by the new key")
    accepted = poll(lambda: response if (response := _get(edge, token)).status_code == 200
                    else None, ROTATION_DEADLINE,
                    "the gateway accepting a JWT-SVID of the new key")  # fmt: skip
    assert accepted.json()["app"] == "users-1"


def test_spans_reach_the_collector_with_the_callers_trace_and_requests_are_logged(
    domain: TrustDomain, gateway: tuple[Proxy, Proxy], collector: OtlpCollector
) -> None:
    edge, users = gateway
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    began = time.monotonic()
    response = _get(edge, _jwt_svid(domain, AUDIENCE), traceparent=f"00-{trace_id}-{parent}-01")
    assert response.status_code == 200, response.text

    at_gateway = collector.wait_for_span(
        lambda span: span.trace_id == trace_id and span.service_name == GATEWAY,
        "the gateway's span of the request, in the caller's trace")  # fmt: skip
    assert at_gateway.parent_span_id == parent
    at_users = collector.wait_for_span(
        lambda span: span.trace_id == trace_id and span.service_name == "users-service",
        "the users-service sidecar's span, in the same trace")  # fmt: skip
    print(f"both spans at the collector {time.monotonic() - began:.1f}s after the request")
    assert at_users.parent_span_id == at_gateway.span_id  # the gateway's traceparent, on

    # A request without a traceparent starts a trace of its own.
    assert _get(edge, _jwt_svid(domain, AUDIENCE)).status_code == 200
    collector.wait_for_span(
        lambda span: span.service_name == GATEWAY and span.trace_id != trace_id
        and span.parent_span_id == "", "a span of a trace the gateway began")  # fmt: skip

    at_edge = poll(lambda: [entry for entry in edge.access_log("gateway_80")
                            if entry["trace_id"] == trace_id] or None,
                   DEADLINE, "the gateway's access log line of the traced request")  # fmt: skip
    assert at_edge[0]["response_code"] == 200
    assert (
        at_edge[0]["route"] == "VirtualService microservice-virtual-service spec.http[0].match[0]"
    )
    assert at_edge[0]["upstream_cluster"] == "outbound|80||users-service"
    assert at_edge[0]["upstream_peer"] == USERS
    assert at_edge[0]["upstream_host"] == users.address
    assert isinstance(at_edge[0]["duration_ms"], int)
    inbound = poll(lambda: [entry for entry in users.access_log("inbound")
                            if entry["trace_id"] == trace_id] or None,
                   DEADLINE, "the sidecar's access log line of the traced request")  # fmt: skip
    assert inbound[0]["response_code"] == 200
    assert inbound[0]["source"] == GATEWAY
    assert inbound[0]["path"] == "/api/v1/users"
    assert isinstance(inbound[0]["duration_ms"], int)
