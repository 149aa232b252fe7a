"""``tessera sidecar run --proxy builtin --outbound``: the app's calls routed by the mesh,
between two built-in sidecars, as users run them (a real server and agent, small HTTP
apps behind the sidecars).

    users   users-service's instance, behind a built-in sidecar (inbound only)
    web     the caller: its app calls through its built-in sidecar's --outbound
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.integration.conftest import tessera
from tests.integration.mesh_fixtures import DEADLINE, App, Proxy, ProxyStarter, healthy, mesh
from tests.integration.sidecar_fixtures import Entry, TrustDomain, processes, trust_domain
from tests.support.processes import poll

pytestmark = [pytest.mark.integration]

USERS = "spiffe://example.org/users"
WEB = "spiffe://example.org/web"

SERVICES = f"""\
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
"""

ROUTES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: users-routes}
spec:
  hosts: [users-service]
  http:
  - match: [{uri: {prefix: /old/}}]
    rewrite: {uri: /new/}
    headers: {response: {set: {x-route: rewrite}}}
    route: [{destination: {host: users-service}}]
  - match: [{uri: {exact: /moved}}]
    redirect: {uri: /here, authority: users.example.com}
  - route: [{destination: {host: users-service}}]
    headers: {response: {set: {x-route: default}}}
"""


@dataclass
class Mesh:
    domain: TrustDomain
    users: App
    web: Proxy


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    directory = tmp_path_factory.mktemp("builtin-outbound")
    with trust_domain(directory, [Entry(USERS), Entry(WEB)]) as domain, processes() as begin:
        tessera("mesh", "apply", "-f", "-", "--data-dir", str(domain.server.data_dir),
                input=SERVICES)  # fmt: skip
        start = ProxyStarter(domain, begin, directory)
        users, web = App.serving("users-1"), App.serving("web-1")
        try:
            callee = start.sidecar("users-1", "users-service", USERS, users, "app=users",
                                   plane="builtin")  # fmt: skip
            caller = start.sidecar("web-1", "web-service", WEB, web, "app=web",
                                   outbound=True, plane="builtin")  # fmt: skip
            callee.wait_ready()
            caller.wait_ready()
            healthy(domain, callee.address)
            yield Mesh(domain, users, caller)
        finally:
            users.stop()
            web.stop()


def call(web: Proxy, host: str, path: str = "/") -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{web.ports['outbound']}{path}", headers={"Host": host},
                     timeout=10, follow_redirects=False)  # fmt: skip


def test_the_caller_s_outbound_reaches_the_service_by_host_with_its_spiffe_id(
    running: Mesh,
) -> None:
    def answered() -> httpx.Response | None:
        response = call(running.web, "users-service", "/api/users?page=2")
        return response if response.status_code == 200 else None

    response = poll(answered, DEADLINE, "users-service answering through web's sidecar")
    document = response.json()
    assert document["app"] == "users-1"
    assert document["path"] == "/api/users?page=2"
    assert document["caller"] == [WEB]  # the SVID web's sidecar presented, nothing else
    # Other spellings of the Service name it too.
    for host in ("users-service:80", "users-service.default.svc.cluster.local"):
        assert call(running.web, host).json()["app"] == "users-1"
    describe = running.web.process.log()
    assert "outbound: HTTP 127.0.0.1:" in describe


def test_a_host_that_names_no_service_is_answered_404_naming_it(running: Mesh) -> None:
    response = call(running.web, "nothing-here", "/")
    assert response.status_code == 404
    assert response.text == (
        "the Host 'nothing-here' names no Service of the mesh this sidecar may call: send "
        "the Service's name (users-service, users-service:80) as the Host\n"
    )


def test_a_virtual_service_rewrites_and_redirects_without_a_restart(running: Mesh) -> None:
    mesh(running.domain, "apply", "-f", "-", stdin=ROUTES)
    try:
        def routed() -> httpx.Response | None:
            response = call(running.web, "users-service", "/old/items?x=1")
            return response if response.headers.get("x-route") == "rewrite" else None

        response = poll(routed, DEADLINE, "the VirtualService's rewrite in effect")
        assert response.status_code == 200
        assert response.json()["path"] == "/new/items?x=1"
        assert call(running.web, "users-service", "/other").headers["x-route"] == "default"

        moved = call(running.web, "users-service", "/moved?a=b")
        assert moved.status_code == 301
        assert moved.headers["location"] == "http://users.example.com/here?a=b"
    finally:
        mesh(running.domain, "delete", "virtualservice", "users-routes")
    # Deleted, the default route again: no header of the VirtualService.
    poll(lambda: "x-route" not in call(running.web, "users-service", "/old/x").headers or None,
         DEADLINE, "the default route once the VirtualService is deleted")  # fmt: skip
