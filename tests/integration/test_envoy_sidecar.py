"""``tessera sidecar run --proxy envoy`` and ``tessera gateway run`` as users run them: a real
server and agent, real Envoys configured by the agent over xDS, small HTTP apps behind them.

One trust domain for the module; every entry selects this test's uid, so each sidecar and
gateway (and the Envoy it runs, attested on its own) holds every SVID and picks its own:

    users      users-service's instances (the docs' Service and AuthorizationPolicy)
    web        web-service: the caller the policy allows, through its own Envoy sidecar
    intruder   a caller no policy names
    gateway    the ingress gateway (allowed in by a policy of its own)
"""

from __future__ import annotations

import os
import re
import shlex
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from spiffe import SpiffeId

from sdk import WorkloadApiX509Source, authorize_id
from sdk.integrations.httpx import httpx_client
from sdk.sidecar.connect import connect_x509_source
from tests.integration.conftest import TESSERA, free_port, tessera
from tests.integration.mesh_fixtures import (
    DEADLINE,
    App,
    Proxy,
    ProxyStarter,
    healthy,
    instances,
)
from tests.integration.sidecar_fixtures import Entry, TrustDomain, processes, trust_domain

DOCS = Path(__file__).resolve().parents[2] / "docs"


def envoy_page() -> tuple[list[list[str]], list[str]]:
    """docs/envoy.md's example: each ``tessera sidecar run`` command's arguments, and
    the curl's."""
    text = (DOCS / "envoy.md").read_text()
    sidecars = [shlex.split(line)[3:] for line in
                re.findall(r"^tessera sidecar run --proxy envoy .*$", text, re.MULTILINE)]
    curl = re.search(r"^curl -H .*$", text, re.MULTILINE)
    assert len(sidecars) == 2 and curl is not None
    return sidecars, shlex.split(curl.group(0))


def page_example() -> tuple[str, list[str]]:
    """The YAML and the ``tessera gateway run`` arguments of docs/gateway.md's example."""
    text = (DOCS / "gateway.md").read_text()
    yaml = re.search(r"^```yaml\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)
    command = re.search(r"^tessera gateway run (.*)$", text, re.MULTILINE)
    assert yaml is not None and command is not None
    return yaml.group(1), shlex.split(command.group(1))

pytestmark = [pytest.mark.integration, pytest.mark.envoy]

USERS = "spiffe://example.org/users"
WEB = "spiffe://example.org/web"
INTRUDER = "spiffe://example.org/intruder"
GATEWAY = "spiffe://example.org/gateway"

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
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: users-round-robin}}
spec:
  host: users-service
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}   # the default is LEAST_REQUEST
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: users-allow-web}}
spec:
  selector: {{matchLabels: {{app: users}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["{WEB}", "{GATEWAY}"]}}
"""


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    entries = [Entry(USERS), Entry(WEB), Entry(INTRUDER), Entry(GATEWAY)]
    with trust_domain(tmp_path_factory.mktemp("envoy-sidecar"), entries) as running:
        tessera("mesh", "apply", "-f", "-", "--data-dir", str(running.server.data_dir),
                input=MESH + "---\n" + page_example()[0])
        yield running


@pytest.fixture(scope="module")
def apps() -> Iterator[dict[str, App]]:
    started = {name: App.serving(name) for name in ("users-1", "users-2", "web")}
    yield started
    for app in started.values():
        app.stop()


@pytest.fixture(scope="module")
def start(domain: TrustDomain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyStarter]:
    with processes() as begin:
        yield ProxyStarter(domain, begin, tmp_path_factory.mktemp("envoy-proxies"))


@pytest.fixture(scope="module")
def users(domain: TrustDomain, apps: dict[str, App], start: ProxyStarter) -> list[Proxy]:
    command = envoy_page()[0][0]
    running = [start.sidecar_with(f"users-{n}", command, apps[f"users-{n}"]) for n in (1, 2)]
    for proxy in running:
        proxy.wait_ready()
        healthy(domain, proxy.address)
    return running


@pytest.fixture(scope="module")
def callers(domain: TrustDomain) -> Iterator[dict[str, WorkloadApiX509Source]]:
    sources = {spiffe_id: connect_x509_source(domain.endpoint, spiffe_id=SpiffeId(spiffe_id))
               for spiffe_id in (WEB, INTRUDER)}  # fmt: skip
    yield sources
    for source in sources.values():
        source.close()


def test_an_envoy_sidecar_lets_the_allowed_caller_in_with_its_identity_and_refuses_others(
    users: list[Proxy], callers: dict[str, WorkloadApiX509Source]
) -> None:
    url = f"https://127.0.0.1:{users[0].ports['inbound']}/api/users"
    with httpx_client(callers[WEB], authorize_id(USERS), timeout=10) as client:
        allowed = client.get(url, headers={"X-Forwarded-Client-Spiffe-Id": INTRUDER,
                                           "x_forwarded_client_spiffe_id": INTRUDER})
    assert allowed.status_code == 200, allowed.text
    assert allowed.json() | {"number": 0} == {"app": "users-1", "path": "/api/users", "number": 0,
                                              "caller": [WEB], "traceparent": None}

    with httpx_client(callers[INTRUDER], authorize_id(USERS), timeout=10) as client:
        refused = client.get(url)
    assert refused.status_code == 403, refused.text

    metrics = users[0].metrics()
    assert metrics["tessera_envoy_up"] == 1
    assert metrics["tessera_sidecar_registered"] == 1
    assert metrics["tessera_sidecar_mesh_revision"] > 0
    assert any(name.startswith("envoy_") for name in metrics), sorted(metrics)[:20]


def test_two_envoy_sidecars_talk_mtls_and_the_server_side_sees_the_callers_id(
    domain: TrustDomain, users: list[Proxy], apps: dict[str, App], start: ProxyStarter
) -> None:
    commands, curl = envoy_page()
    web = start.sidecar_with("web", commands[1], apps["web"])
    web.wait_ready()
    host = curl[curl.index("-H") + 1].partition(": ")[2]
    path = "/" + curl[-1].split("/", 3)[3]
    answers = set()
    for _ in range(4):
        answer = httpx.get(f"http://127.0.0.1:{web.ports['outbound']}{path}",
                           headers={"Host": host}, timeout=10)  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.json()["caller"] == [WEB]
        answers.add(answer.json()["app"])
    assert answers == {"users-1", "users-2"}  # balanced over both instances

    web.process.send_signal(signal.SIGTERM)
    assert web.process.wait(timeout=DEADLINE) == 0
    assert "Sidecar stopped." in web.process.log()
    assert all(i["address"] != web.address for i in instances(domain))


@pytest.mark.parametrize("plane", ["envoy", "builtin"])
def test_the_missions_gateway_routes_by_uri_to_both_instances(
    plane: str, users: list[Proxy], start: ProxyStarter
) -> None:
    _, args = page_example()
    offset = free_port() - 80
    args[args.index("--port-offset") + 1] = str(offset)
    proxy = start.gateway(f"gateway-{plane}", None, offset=offset, labels=(), args=args,
                          plane=plane)  # fmt: skip
    proxy.wait_ready()
    url = f"http://127.0.0.1:{proxy.ports['http']}"
    with httpx.Client(timeout=10) as client:  # one connection: one Envoy worker's round robin
        reached = [client.get(url + "/api/v1/users") for _ in range(4)]
    assert [answer.status_code for answer in reached] == [200] * 4, reached[-1].text
    assert {answer.json()["caller"][0] for answer in reached} == {GATEWAY}
    apps = [answer.json()["app"] for answer in reached]
    assert apps[0] != apps[1] and apps[:2] == apps[2:], apps  # round robin: alternating
    assert httpx.get(url + "/api/v2/orders", timeout=10).status_code == 404
    assert f"listening on 0.0.0.0:{proxy.ports['http']}" in proxy.process.log()
    if plane == "envoy":
        assert proxy.metrics()["tessera_envoy_up"] == 1
    else:  # its requests counted by route, as the gateway called into the mesh
        assert any(line.startswith("tessera_sidecar_requests_total{") and GATEWAY in line
                   and 'code="200"' in line and line.endswith(" 4.0")
                   for line in proxy.get("/metrics").text.splitlines()), proxy.get("/metrics").text

    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=DEADLINE) == 0
    assert "Gateway stopped." in proxy.process.log()


@pytest.mark.parametrize("plane", ["envoy", "builtin"])
def test_a_gateway_no_gateway_selects_says_so_on_ready(plane: str, start: ProxyStarter) -> None:
    proxy = start.gateway(f"lonely-gateway-{plane}", GATEWAY, offset=0, labels=("istio=nobody",),
                          plane=plane)  # fmt: skip

    def reason() -> str | None:
        answer = proxy.get("/ready")
        text: str = answer.json().get("reason", "")
        return text if "no Gateway" in text else None

    assert proxy.process.wait_until(reason, "/ready saying no Gateway selects it", DEADLINE) == (
        "no Gateway selects this gateway's labels (istio=nobody): apply one whose "
        "spec.selector matches them (tessera mesh get gateway)")  # fmt: skip
    proxy.process.stop()


def test_an_envoy_that_dies_is_started_again_and_serves(
    users: list[Proxy], callers: dict[str, WorkloadApiX509Source]
) -> None:
    sidecar = users[1]
    pids = re.findall(r"Envoy started \(pid (\d+)\)", sidecar.process.log())
    os.kill(int(pids[-1]), signal.SIGKILL)

    sidecar.process.wait_until(
        lambda: sidecar.metrics().get("tessera_envoy_restarts_total") == 1 or None,
        "counting the restart on /metrics", DEADLINE)  # fmt: skip
    sidecar.wait_ready()
    url = f"https://{sidecar.address}/after-restart"
    with httpx_client(callers[WEB], authorize_id(USERS), timeout=10) as client:
        answer = client.get(url)
    assert (answer.status_code, answer.json()["app"]) == (200, "users-2")
    assert len(re.findall(r"Envoy started \(pid (\d+)\)", sidecar.process.log())) == 2


def test_an_inbound_or_outbound_port_in_use_is_refused_before_envoy_starts(
    users: list[Proxy], apps: dict[str, App], start: ProxyStarter
) -> None:
    taken = users[0].ports["inbound"]  # another Envoy listens there
    for flag in ("--inbound", "--outbound"):
        args = [TESSERA, "sidecar", "run", "--proxy", "envoy", "--service", "web-service",
                "--spiffe-id", WEB, "--app", apps["web"].address, "--health-bind", "0",
                flag, f"127.0.0.1:{taken}"]  # fmt: skip
        process = start.begin(f"clash{flag}", args, directory=start.directory,
                              env=start.domain.env())  # fmt: skip
        assert process.wait(timeout=DEADLINE) == 1
        assert (f"Error: cannot listen on {flag} 127.0.0.1:{taken}: Address already in use; "
                f"choose another {flag}\n") in process.log()  # fmt: skip
    elsewhere = start.begin("not-this-host", [
        TESSERA, "sidecar", "run", "--proxy", "envoy", "--service", "web-service",
        "--spiffe-id", WEB, "--app", apps["web"].address, "--health-bind", "0",
        "--inbound", "192.0.2.1:0"], directory=start.directory, env=start.domain.env())  # fmt: skip
    assert elsewhere.wait(timeout=DEADLINE) == 1
    assert ("Error: cannot listen on --inbound 192.0.2.1:0: Cannot assign requested address; "
            "choose another --inbound\n") in elsewhere.log()  # fmt: skip


def test_a_second_gateway_like_a_running_one_is_refused_and_the_first_serves_on(
    users: list[Proxy], start: ProxyStarter
) -> None:
    offset = free_port() - 80
    first = start.gateway("first-gateway", GATEWAY, offset=offset)
    first.wait_ready()
    second = start.gateway("second-gateway", GATEWAY, offset=offset)
    assert second.process.wait(timeout=DEADLINE) == 1
    assert "Error: another Tessera process (pid " in second.process.log()
    answer = httpx.get(f"http://127.0.0.1:{first.ports['http']}/api/v1/users", timeout=10)
    assert answer.status_code == 200
    assert first.metrics()["tessera_sidecar_svid_expiry_timestamp_seconds"] > 0

    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=DEADLINE) == 0
    admin = re.search(r"admin (\S+)/admin\.sock\)", first.process.log())
    assert admin is not None and not Path(admin.group(1)).exists()  # its directory is gone
