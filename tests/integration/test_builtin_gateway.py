"""``tessera gateway run --proxy builtin`` as users run it: a real server and agent, two
instances of users-service behind built-in sidecars, and the gateway on the built-in
proxy, started from the command line with docs/gateway.md's own example.

    users      users-service's instances (a policy lets the gateway in)
    gateway    the ingress gateway's SVID
"""

from __future__ import annotations

import re
import shlex
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port, tessera
from tests.integration.mesh_fixtures import DEADLINE, App, Proxy, ProxyStarter, healthy, mesh
from tests.integration.sidecar_fixtures import Entry, TrustDomain, processes, trust_domain
from tests.integration.test_envoy_sidecar import DOCS, page_example
from tests.support.pki import self_signed, write_key_pem, write_pem
from tests.support.processes import poll

pytestmark = [pytest.mark.integration]

USERS = "spiffe://example.org/users"
GATEWAY = "spiffe://example.org/gateway"
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
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: users-round-robin}}
spec:
  host: users-service
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: users-allow-gateway}}
spec:
  selector: {{matchLabels: {{app: users}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["{GATEWAY}"]}}
"""


def later_gateway(cert: Path, key: Path) -> str:
    """A Gateway for the labels istio=later: HTTPS on 443 for api.example.com, and port 80
    redirecting there."""
    return f"""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: later-gateway}}
spec:
  selector: {{istio: later}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [api.example.com]
    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [api.example.com]
    tls: {{httpsRedirect: true}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: later-routes}}
spec:
  hosts: [api.example.com]
  gateways: [later-gateway]
  http:
  - match: [{{uri: {{prefix: /api/}}}}]
    route: [{{destination: {{host: users-service}}}}]
"""


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    entries = [Entry(USERS), Entry(GATEWAY)]
    with trust_domain(tmp_path_factory.mktemp("builtin-gateway"), entries) as running:
        tessera("mesh", "apply", "-f", "-", "--data-dir", str(running.server.data_dir),
                input=MESH + "---\n" + page_example()[0])  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def start(domain: TrustDomain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyStarter]:
    with processes() as begin:
        yield ProxyStarter(domain, begin, tmp_path_factory.mktemp("builtin-gateway-proxies"))


@pytest.fixture(scope="module")
def users(domain: TrustDomain, start: ProxyStarter) -> Iterator[list[Proxy]]:
    apps = [App.serving(f"users-{n}") for n in (1, 2)]
    try:
        running = [start.sidecar(app.name, "users-service", USERS, app, "app=users",
                                 plane="builtin") for app in apps]  # fmt: skip
        for proxy in running:
            proxy.wait_ready()
            healthy(domain, proxy.address)
        yield running
    finally:
        for app in apps:
            app.stop()


def builtin_command() -> list[str]:
    """The arguments of docs/gateway.md's ``tessera gateway run --proxy builtin`` line."""
    text = (DOCS / "gateway.md").read_text()
    command = re.search(r"^tessera gateway run (--proxy builtin .*)$", text, re.MULTILINE)
    assert command is not None
    return shlex.split(command.group(1))


def test_the_docs_gateway_routes_by_uri_to_both_instances_on_the_built_in_proxy(
    users: list[Proxy], start: ProxyStarter
) -> None:
    args = builtin_command()
    offset = free_port() - 80
    args[args.index("--port-offset") + 1] = str(offset)
    proxy = start.gateway("gateway", None, offset=offset, labels=(), args=args)
    proxy.wait_ready()
    url = f"http://127.0.0.1:{proxy.ports['http']}"
    forged = {"X-Forwarded-Client-Spiffe-Id": INTRUDER, "x_forwarded_client_spiffe_id": INTRUDER}
    with httpx.Client(timeout=10) as client:
        reached = [client.get(url + "/api/v1/users", headers=forged) for _ in range(4)]
        other = client.get(url + "/api/v2/orders")
    assert [answer.status_code for answer in reached] == [200] * 4, reached[-1].text
    assert {tuple(answer.json()["caller"]) for answer in reached} == {(GATEWAY,)}
    apps = [answer.json()["app"] for answer in reached]
    assert apps[0] != apps[1] and apps[:2] == apps[2:], apps  # round robin: alternating
    assert other.status_code == 404
    log = proxy.process.log()
    assert "(Workload API " in log and "; the built-in proxy)" in log
    assert (f"listening on 0.0.0.0:{proxy.ports['http']} (port 80 + {offset}): Gateway "
            "servers of port 80") in log  # fmt: skip
    assert "Gateway is ready. Ctrl-C stops it." in log
    metrics = proxy.metrics()
    assert metrics["tessera_sidecar_requests_total"] >= 1
    assert metrics["tessera_sidecar_svid_expiry_timestamp_seconds"] > 0

    def logged() -> list[dict[str, object]] | None:  # lines are written within a second
        records = proxy.access_log("gateway_80")
        return records if {record["response_code"] for record in records} == {200, 404} else None

    proxy.process.wait_until(logged, "the 200s and the 404 in the access log", DEADLINE)

    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=DEADLINE) == 0
    assert "Gateway stopped." in proxy.process.log()


def test_a_gateway_applied_later_opens_its_ports_without_a_restart_and_closes_them(
    users: list[Proxy], start: ProxyStarter, domain: TrustDomain, tmp_path: Path
) -> None:
    offset = next(offset for offset in (free_port() - 80 for _ in range(50))
                  if offset + 443 <= 65535 and _free(offset + 443))  # fmt: skip
    proxy = start.gateway("later-gateway", GATEWAY, offset=offset, labels=("istio=later",),
                          plane="builtin")  # fmt: skip

    def reason() -> str | None:
        try:
            text: str = proxy.get("/ready").json().get("reason", "")
        except httpx.TransportError:
            return None
        return text if "no Gateway" in text else None

    assert proxy.process.wait_until(reason, "/ready saying no Gateway selects it", DEADLINE) == (
        "no Gateway selects this gateway's labels (istio=later): apply one whose "
        "spec.selector matches them (tessera mesh get gateway)")  # fmt: skip

    issued = self_signed(subject="api.example.com", dns_names=["api.example.com"])
    cert = write_pem(tmp_path / "api.pem", issued.certificate)
    key = write_key_pem(tmp_path / "api.key", issued.key)
    mesh(domain, "apply", "-f", "-", stdin=later_gateway(cert, key))
    try:
        proxy.wait_ready()
        trusted = ssl.create_default_context(cafile=str(cert))
        trusted.check_hostname = False  # reached at 127.0.0.1; the Host names the server
        secure = f"https://127.0.0.1:{offset + 443}"
        answer = httpx.get(secure + "/api/items", headers={"Host": "api.example.com"},
                           verify=trusted, timeout=10)  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.json()["caller"] == [GATEWAY]
        moved = httpx.get(f"http://127.0.0.1:{offset + 80}/api/items?x=1",
                          headers={"Host": "api.example.com"}, timeout=10)  # fmt: skip
        assert moved.status_code == 301
        assert moved.headers["location"] == "https://api.example.com/api/items?x=1"
        log = proxy.process.log()
        assert f"listening on 0.0.0.0:{offset + 443} (port 443 + {offset})" in log
        assert "Gateway is ready." in log
    finally:
        mesh(domain, "delete", "virtualservice", "later-routes")
        mesh(domain, "delete", "gateway", "later-gateway")
    assert poll(reason, DEADLINE, "/ready saying no Gateway selects it again")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{offset + 80}/", timeout=5)  # the port is closed
    assert proxy.process.log().count("no Gateway selects this gateway's labels") >= 2
    proxy.process.stop()


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True
