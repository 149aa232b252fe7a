"""Gateway: a full example, and what a new user gets wrong."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import Gateway, parse_documents, parse_resource
from tests.unit.mesh.documents import MISSION, REMOVE, errors, load, with_field

FULL = """\
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {name: public-gateway, namespace: istio-system}
spec:
  selector: {istio: public, zone: eu}
  servers:
  - name: https-api
    port: {number: 443, name: https, protocol: HTTPS}
    hosts: [api.example.com, "*.apps.example.com"]
    tls:
      mode: SIMPLE
      serverCertificate: /etc/tessera/gateway/api.pem
      privateKey: /etc/tessera/gateway/api.key
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["./api.example.com", "*/www.example.com"]
    tls: {httpsRedirect: true}
  - port: {number: 80, protocol: HTTP}
    hosts: [legacy.example.com]
"""

GATEWAY = load(FULL)
NAME = "Gateway public-gateway"


def test_full_example() -> None:
    [resource] = parse_documents(FULL)
    assert isinstance(resource, Gateway)
    https, redirect, legacy = resource.spec.servers
    assert https.tls is not None and https.tls.private_key == "/etc/tessera/gateway/api.key"
    assert redirect.tls is not None and redirect.tls.https_redirect is True
    assert legacy.port.name is None
    assert resource.spec.selector == {"istio": "public", "zone": "eu"}
    assert parse_resource(resource.to_document()) == resource


def test_the_mission_s_gateway() -> None:
    gateway, _ = parse_documents(MISSION)
    assert isinstance(gateway, Gateway)
    assert gateway.spec.servers[0].port.number == 80
    assert gateway.spec.servers[0].hosts == ("*",)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "spec.selector",
            REMOVE,
            "spec.selector is required",
        ),
        ("spec.selector", {}, "spec.selector must not be empty"),
        ("spec.servers", [], "spec.servers must not be empty"),
        (
            "spec.servers[0].port.protocol",
            "TCP",
            "spec.servers[0].port.protocol must be HTTP or HTTPS, not 'TCP'",
        ),
        (
            "spec.servers[0].port.number",
            70000,
            "spec.servers[0].port.number must be a port number from 1 to 65535, got 70000",
        ),
        (
            "spec.servers[0].port.targetPort",
            8443,
            "spec.servers[0].port.targetPort is not supported",
        ),
        (
            "spec.servers[0].tls",
            REMOVE,
            "spec.servers[0] must have tls with mode: SIMPLE, serverCertificate, privateKey "
            "for protocol HTTPS",
        ),
        (
            "spec.servers[0].tls.privateKey",
            REMOVE,
            "spec.servers[0] must have tls with privateKey for protocol HTTPS",
        ),
        (
            "spec.servers[0].tls.mode",
            "MUTUAL",
            "spec.servers[0].tls.mode must be SIMPLE, not 'MUTUAL'",
        ),
        (
            "spec.servers[0].tls.credentialName",
            "api-cert",
            "spec.servers[0].tls.credentialName is not supported",
        ),
        (
            "spec.servers[0].tls.serverCertificate",
            "certs/api.pem",
            "spec.servers[0].tls.serverCertificate must be an absolute file path (the process "
            "serving it reads the file where it runs), e.g. /etc/tessera/gateway/cert.pem",
        ),
        (
            "spec.servers[0].tls.httpsRedirect",
            True,
            "spec.servers[0] cannot have tls.httpsRedirect on an HTTPS server (it belongs on "
            "the HTTP server that sends callers to this one)",
        ),
        (
            "spec.servers[1].tls",
            {"mode": "SIMPLE"},
            "spec.servers[1] cannot have tls.mode, serverCertificate or privateKey with "
            "protocol HTTP (use protocol HTTPS); an HTTP server's tls may only set "
            "httpsRedirect",
        ),
        (
            "spec.servers[1].tls.httpsRedirect",
            "yes",
            "spec.servers[1].tls.httpsRedirect must be true or false, not a string ('yes')",
        ),
        (
            "spec.servers[2].port.number",
            443,
            "spec.servers has port 443 as both HTTPS and HTTP",
        ),
        (
            "spec.servers[2].name",
            "https-api",
            "spec.servers has two servers named 'https-api'",
        ),
        ("spec.servers[2].hosts", [], "spec.servers[2].hosts must not be empty"),
        (
            "spec.servers[2].hosts",
            ["API.example.com"],
            "spec.servers[2].hosts[0] must be a lower-case DNS name (reviews, api.example.com), "
            "a wildcard '*.example.com' or '*'",
        ),
        ("spec.servers[2].bind", "0.0.0.0", "spec.servers[2].bind is not supported"),
    ],
)
def test_refused(path: str, value: Any, expected: str) -> None:
    assert errors(with_field(GATEWAY, path, value)) == [f"{NAME}: {expected}"]
