"""``tessera gateway run --proxy builtin`` as users run it: a real server and agent, a
built-in sidecar in front of a small app, and the gateway started from the CLI before any
Gateway selects it.

One case walks what a user does to it in turn: the gateway waits (``/ready`` says no
Gateway selects it), a Gateway applied later opens its HTTP port without a restart and
routes into the mesh with the gateway's SVID, a second server on an HTTPS port terminates
TLS with its certificate files, an AuthorizationPolicy selecting the gateway refuses a
path, a RequestAuthentication (which the built-in gateway cannot check) refuses every
request rather than letting one through unchecked, and deleting the Gateway closes its
ports.
"""

from __future__ import annotations

import datetime
import signal
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import free_port
from tests.integration.mesh_fixtures import DEADLINE, App, ProxyStarter, healthy, mesh
from tests.integration.sidecar_fixtures import Entry, TrustDomain, processes, trust_domain
from tests.support.processes import poll

pytestmark = [pytest.mark.integration]

USERS = "spiffe://example.org/users"
GATEWAY = "spiffe://example.org/gateway"

MESH = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users-service}}
spec:
  spiffeIds: [{USERS}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  healthCheck: {{http: {{path: /healthz}}, interval: 1s}}
"""


def gateway_documents(certificate: Path, key: Path) -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge}}
spec:
  selector: {{istio: edge}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ["*"]
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [api.example.com]
    tls: {{mode: SIMPLE, serverCertificate: {certificate}, privateKey: {key}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: edge-users}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - match: [{{uri: {{prefix: /api/users}}}}]
    route: [{{destination: {{host: users-service}}}}]
"""


POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: edge-no-admin}
spec:
  selector: {matchLabels: {istio: edge}}
  action: DENY
  rules:
  - to: [{operation: {paths: [/api/users/admin]}}]
"""

JWT = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: edge-jwt}
spec:
  selector: {matchLabels: {istio: edge}}
  jwtRules:
  - issuer: https://issuer.example.com
    jwksUri: https://issuer.example.com/jwks.json
"""


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for ``name`` and its key, as files a Gateway's TLS names."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    key_path.chmod(0o600)
    return cert_path, key_path


def answered(url: str, status: int) -> Callable[[], httpx.Response | None]:
    """For :func:`poll`: GET ``url``, the answer once it has ``status``."""

    def get() -> httpx.Response | None:
        answer = httpx.get(url, timeout=10)
        return answer if answer.status_code == status else None

    return get


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustDomain]:
    with trust_domain(tmp_path_factory.mktemp("builtin-gateway"),
                      [Entry(USERS), Entry(GATEWAY)]) as running:  # fmt: skip
        mesh(running, "apply", "-f", "-", stdin=MESH)
        yield running


def test_the_builtin_gateway_opens_routes_terminates_tls_and_refuses_what_it_must(
    domain: TrustDomain, tmp_path: Path
) -> None:
    certificate, key = self_signed(tmp_path, "api.example.com")
    app = App.serving("users-1")
    try:
        with processes() as begin:
            start = ProxyStarter(domain, begin, tmp_path)
            users = start.sidecar("users-1", "users-service", USERS, app, "app=users",
                                  plane="builtin")  # fmt: skip
            users.wait_ready()
            healthy(domain, users.address)
            offset = free_port() - 80
            gateway = start.gateway("edge", GATEWAY, offset=offset, labels=("istio=edge",),
                                    plane="builtin")  # fmt: skip
            poll(lambda: "no Gateway selects" in gateway.get("/ready").text or None,
                 DEADLINE, "/ready saying no Gateway selects the gateway")  # fmt: skip

            mesh(domain, "apply", "-f", "-", stdin=gateway_documents(certificate, key))
            gateway.wait_ready()
            http = f"http://127.0.0.1:{80 + offset}"
            answer = httpx.get(f"{http}/api/users/1", timeout=10)
            assert answer.status_code == 200, answer.text
            assert (answer.json()["app"], answer.json()["caller"]) == ("users-1", [GATEWAY])
            assert httpx.get(f"{http}/elsewhere", timeout=10).status_code == 404
            log = gateway.process.log()
            assert f"listening on 0.0.0.0:{80 + offset} (port 80 + {offset})" in log
            assert f"listening on 0.0.0.0:{443 + offset} (port 443 + {offset})" in log

            context = ssl.create_default_context(cafile=str(certificate))
            with httpx.Client(verify=context, timeout=10) as client:
                secure = client.get(f"https://127.0.0.1:{443 + offset}/api/users/2",
                                    headers={"Host": "api.example.com"},
                                    extensions={"sni_hostname": "api.example.com"})
            assert (secure.status_code, secure.json()["path"]) == (200, "/api/users/2")

            mesh(domain, "apply", "-f", "-", stdin=POLICY)
            refused = poll(answered(f"{http}/api/users/admin", 403), DEADLINE,
                           "the DENY policy refusing /api/users/admin")  # fmt: skip
            assert "AuthorizationPolicy edge-no-admin spec.rules[0]" in refused.text
            assert httpx.get(f"{http}/api/users/1", timeout=10).status_code == 200

            mesh(domain, "apply", "-f", "-", stdin=JWT)
            unchecked = poll(answered(f"{http}/api/users/1", 401), DEADLINE,
                             "a RequestAuthentication refusing every request")
            assert "RequestAuthentication edge-jwt" in unchecked.text
            assert "--proxy envoy" in unchecked.text
            mesh(domain, "delete", "requestauthentication", "edge-jwt")
            mesh(domain, "delete", "authorizationpolicy", "edge-no-admin")

            mesh(domain, "delete", "virtualservice", "edge-users")
            mesh(domain, "delete", "gateway", "edge")

            def closed() -> bool | None:
                try:
                    httpx.get(f"{http}/api/users/1", timeout=2)
                except httpx.ConnectError:
                    return True
                return None

            poll(closed, DEADLINE, "the gateway's port closed once no Gateway selects it")
            gateway.process.send_signal(signal.SIGTERM)
            assert gateway.process.wait(timeout=DEADLINE) == 0, gateway.process.log()
            assert "Gateway stopped." in gateway.process.log()
            users.process.send_signal(signal.SIGTERM)
            assert users.process.wait(timeout=DEADLINE) == 0
    finally:
        app.stop()
