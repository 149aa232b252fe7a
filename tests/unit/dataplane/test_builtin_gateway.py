"""The built-in gateway's decisions that need no mesh: which server and route a request
gets, the redirect to https, the JWT refusal, the AuthorizationPolicies of a caller
without a SPIFFE ID, the fields it drops, and the certificate SNI picks."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from dataplane.builtin_gateway import (
    RBAC_DENIED,
    LocalAnswer,
    gateway_decision,
    gateway_head,
    https_context,
    token_sent,
)
from mesh import Catalog, GatewayProxy, compile_view
from mesh.request import HttpRequest
from mesh.view import DirectResponse, Forward, View
from sdk.sidecar.http import NO_BODY, RequestHead
from tests.support.pki import self_signed, write_key_pem, write_pem
from tests.unit.mesh.documents import MISSION, USERS_SERVICE
from tests.unit.mesh.meshes import GATEWAY, INGRESS, USERS_INSTANCES, configured

PUBLIC = {"istio": "public"}
EDGE = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public}
spec:
  selector: {istio: public}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, serverCertificate: /CERT_A, privateKey: /KEY_A}
  - port: {number: 443, name: https-any, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, serverCertificate: /CERT_B, privateKey: /KEY_B}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [api.example.com]
    tls: {httpsRedirect: true}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.example.com]
  gateways: [public]
  http:
  - match: [{uri: {prefix: /users}}]
    route: [{destination: {host: users-service}}]
"""
JWT = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: edge-jwt}
spec:
  selector: {matchLabels: {istio: public}}
  jwtRules:
  - issuer: https://accounts.example.com
    jwksUri: https://accounts.example.com/.well-known/jwks.json
"""
POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: edge-allow}
spec:
  selector: {matchLabels: {istio: public}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["spiffe://example.org/web"]}}]
    to: [{operation: {paths: [/admin]}}]
  - to: [{operation: {methods: [GET], paths: ["/users*"]}}]
"""


def view_of(labels: dict[str, str], *texts: str) -> View:
    return compile_view(configured(USERS_SERVICE, *texts), Catalog(USERS_INSTANCES),
                        GatewayProxy(GATEWAY, labels))  # fmt: skip


def decide(view: View, port: int, host: str, method: str, path: str, *, tls: bool = False,
           headers: dict[str, str] | None = None) -> object:  # fmt: skip
    request = HttpRequest(method, path, {"host": host, **(headers or {})}, port)
    return gateway_decision(view, port, host, request, tls=tls)


def test_the_missions_gateway_routes_its_uri_and_answers_404_to_the_rest() -> None:
    view = view_of(INGRESS, MISSION)
    route = decide(view, 80, "localhost:18080", "GET", "/api/v1/users")
    assert not isinstance(route, LocalAnswer)
    assert isinstance(route.action, Forward)  # type: ignore[attr-defined]
    assert [d.service for d in route.action.destinations] == ["users-service"]  # type: ignore[attr-defined]
    other = decide(view, 80, "localhost", "GET", "/api/v2/orders")  # the VirtualService's 404
    assert isinstance(other.action, DirectResponse) and other.action.status == 404  # type: ignore[attr-defined]
    gone = decide(view, 443, "localhost", "GET", "/api/v1/users")  # a port no Gateway has
    assert isinstance(gone, LocalAnswer) and gone.status == 404


def test_a_redirecting_server_answers_301_to_https_on_plain_http_only() -> None:
    view = view_of(PUBLIC, EDGE)
    answer = decide(view, 80, "API.example.com:18080", "GET", "/users/7?x=1")
    assert answer == LocalAnswer(301, "", details="redirect",
                                 location="https://api.example.com/users/7?x=1")  # fmt: skip
    elsewhere = decide(view, 80, "other.example.com", "GET", "/users/7")
    assert isinstance(elsewhere, LocalAnswer) and elsewhere.status == 404
    assert not isinstance(decide(view, 443, "api.example.com", "GET", "/users/7", tls=True),
                          LocalAnswer)  # fmt: skip


def test_a_token_the_built_in_gateway_cannot_check_is_refused_not_let_through() -> None:
    view = view_of(PUBLIC, EDGE, JWT)
    refused = decide(view, 443, "api.example.com", "GET", "/users", tls=True,
                     headers={"Authorization": "Bearer abc.def.ghi"})  # fmt: skip
    assert isinstance(refused, LocalAnswer) and refused.status == 401
    assert "RequestAuthentication edge-jwt" in refused.text and "--proxy envoy" in refused.text
    in_query = decide(view, 443, "api.example.com", "GET", "/users?access_token=abc", tls=True)
    assert isinstance(in_query, LocalAnswer) and in_query.status == 401
    without = decide(view, 443, "api.example.com", "GET", "/users", tls=True)
    assert not isinstance(without, LocalAnswer)  # no token: judged as Envoy judges it
    assert token_sent(view_of(PUBLIC, EDGE).jwt_rules, HttpRequest(
        "GET", "/", {"authorization": "Bearer x"})) is None  # no RequestAuthentication


def test_policies_judge_a_caller_without_a_spiffe_id_principals_never_match() -> None:
    view = view_of(PUBLIC, EDGE, POLICY)
    assert not isinstance(decide(view, 443, "api.example.com", "GET", "/users/1", tls=True),
                          LocalAnswer)  # fmt: skip
    for method, path in (("POST", "/users/1"), ("GET", "/admin")):
        refused = decide(view, 443, "api.example.com", method, path, tls=True,
                         headers={"X-Forwarded-Client-Spiffe-Id": "spiffe://example.org/web"})
        assert isinstance(refused, LocalAnswer), (method, path)
        assert (refused.status, refused.text, refused.flags) == (403, RBAC_DENIED, "RBAC")
        assert "AuthorizationPolicy edge-allow" in refused.details


def test_identity_fields_a_caller_sends_are_dropped_in_every_spelling() -> None:
    head = RequestHead("GET", "/", "HTTP/1.1", (
        ("Host", "api.example.com"), ("X-Forwarded-Client-Spiffe-Id", "spiffe://example.org/x"),
        ("x_forwarded_client_spiffe_id", "spiffe://example.org/y"),
        ("X-FORWARDED-CLIENT-CERT", "By=spiffe://example.org/z"),
        ("X-Forwarded-For", "192.0.2.1"), ("X-Forwarded-Proto", "https"), ("Accept", "*/*"),
    ), NO_BODY, "/")  # fmt: skip
    passed = gateway_head(head, tls=False, source_ip="198.51.100.7")
    assert passed.headers == (
        ("Host", "api.example.com"), ("Accept", "*/*"),
        ("x-forwarded-for", "192.0.2.1, 198.51.100.7"), ("x-forwarded-proto", "http"),
    )  # fmt: skip


def test_sni_picks_the_certificate_of_the_most_specific_server(tmp_path: Path) -> None:
    names = {}
    text = EDGE
    for letter, dns in (("A", "api.example.com"), ("B", "any.example.com")):
        issued = self_signed(subject=dns, dns_names=[dns])
        cert = write_pem(tmp_path / f"{letter}.pem", issued.certificate)
        key = write_key_pem(tmp_path / f"{letter}.key", issued.key)
        text = text.replace(f"/CERT_{letter}", str(cert)).replace(f"/KEY_{letter}", str(key))
        names[letter] = dns
    listener = view_of(PUBLIC, text).listener(443)
    assert listener is not None
    context = https_context(listener)

    async def presented(server_name: str | None) -> str:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                      server_hostname=server_name)  # fmt: skip
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()
        certificate = x509.load_der_x509_certificate(der)
        return str(certificate.subject.rfc4514_string())

    assert asyncio.run(presented("api.example.com")) == f"CN={names['A']}"
    assert asyncio.run(presented("shop.example.com")) == f"CN={names['B']}"
    assert asyncio.run(presented(None)) == f"CN={names['B']}"  # no SNI: the * server's


def test_an_https_port_whose_certificate_is_missing_says_which_file() -> None:
    text = EDGE.replace("/CERT_A", "/nonexistent/a.pem").replace("/KEY_A", "/nonexistent/a.key")
    listener = view_of(PUBLIC, text).listener(443)
    assert listener is not None
    with pytest.raises(Exception, match=r"cannot load its serverCertificate /nonexistent/a\.pem"):
        https_context(listener)
