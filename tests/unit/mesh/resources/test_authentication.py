"""RequestAuthentication: a full example, and what a new user gets wrong."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh import RequestAuthentication, parse_documents, parse_resource
from tests.unit.mesh.documents import REMOVE, errors, load, with_field

JWKS = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "1"}]})

FULL = f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: edge-jwt}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  jwtRules:
  - issuer: spiffe://example.org
    audiences: [edge, api]
    fromHeaders: [{{name: x-jwt-svid}}]
  - issuer: https://accounts.example.com
    jwksUri: https://accounts.example.com/.well-known/jwks.json
    fromHeaders: [{{name: authorization, prefix: "Bearer "}}]
    fromParams: [access_token]
    forwardOriginalToken: true
  - issuer: partner
    jwks: '{JWKS}'
"""

AUTHENTICATION = load(FULL)
NAME = "RequestAuthentication edge-jwt"


def test_full_example() -> None:
    [resource] = parse_documents(FULL)
    assert isinstance(resource, RequestAuthentication)
    own, accounts, partner = resource.spec.jwt_rules
    assert own.trust_domain == "example.org"
    assert accounts.trust_domain is None
    assert accounts.from_headers is not None and accounts.from_headers[0].prefix == "Bearer "
    assert partner.jwks == JWKS
    assert parse_resource(resource.to_document()) == resource


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.jwtRules", [], "spec.jwtRules must not be empty"),
        ("spec.jwtRules[0].issuer", REMOVE, "spec.jwtRules[0].issuer is required"),
        (
            "spec.jwtRules[0].audiences",
            REMOVE,
            "spec.jwtRules[0] must have audiences with a trust domain as issuer: a JWT-SVID is "
            "valid only for the audience it was minted for",
        ),
        (
            "spec.jwtRules[0].jwksUri",
            "https://example.org/jwks",
            "spec.jwtRules[0] cannot have jwksUri or jwks with a trust domain as issuer: its "
            "JWT-SVIDs are checked against the trust domain's own JWT bundle",
        ),
        (
            "spec.jwtRules[0].issuer",
            "spiffe://example.org/issuer",
            "spec.jwtRules[0] must have as issuer a trust domain's ID (spiffe://example.org, no "
            "path) to accept its JWT-SVIDs",
        ),
        (
            "spec.jwtRules[0].issuer",
            "spiffe://Example.org",
            "spec.jwtRules[0]: trust domain 'Example.org' is not valid: trust domain must be "
            "lower case; use lower-case letters, digits, '.', '-' and '_', e.g. example.org",
        ),
        (
            "spec.jwtRules[1].jwksUri",
            REMOVE,
            "spec.jwtRules[1] must have one of jwksUri or jwks: Tessera does not look up an "
            "issuer's keys by itself",
        ),
        (
            "spec.jwtRules[1].jwks",
            JWKS,
            "spec.jwtRules[1] must have one of jwksUri or jwks: Tessera does not look up an "
            "issuer's keys by itself",
        ),
        (
            "spec.jwtRules[1].jwksUri",
            "accounts.example.com/jwks",
            "spec.jwtRules[1].jwksUri must be an https:// (or http://) URL, e.g. "
            "https://idp.example.com/jwks",
        ),
        (
            "spec.jwtRules[2].jwks",
            "{not json",
            'spec.jwtRules[2].jwks must be a JWK Set in JSON ({"keys": [...]})',
        ),
        (
            "spec.jwtRules[2].jwks",
            '{"keys": []}',
            'spec.jwtRules[2].jwks must be a JWK Set in JSON with a non-empty "keys" list',
        ),
        (
            "spec.jwtRules[2].jwks",
            '{"keys": [{"kid": "1"}]}',
            'spec.jwtRules[2].jwks must be a JWK Set whose keys are objects with a "kty"',
        ),
        (
            "spec.jwtRules[2].issuer",
            "https://accounts.example.com",
            "spec.jwtRules has two rules for issuer https://accounts.example.com",
        ),
        (
            "spec.jwtRules[1].outputPayloadToHeader",
            "x-jwt",
            "spec.jwtRules[1].outputPayloadToHeader is not supported",
        ),
        (
            "spec.jwtRules[1].fromHeaders[0].name",
            "Authorization",
            "spec.jwtRules[1].fromHeaders[0].name must be a header name: lower-case letters, "
            "digits and '-' (an HTTP token), e.g. x-request-id",
        ),
    ],
)
def test_refused(path: str, value: Any, expected: str) -> None:
    assert errors(with_field(AUTHENTICATION, path, value)) == [f"{NAME}: {expected}"]
