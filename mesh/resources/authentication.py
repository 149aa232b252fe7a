"""``RequestAuthentication`` (security.istio.io): which JWTs the selected workloads accept.

Tessera's subset of Istio's fields (everything else is refused by name):

- spec: ``selector.matchLabels``, ``jwtRules``
- jwtRules[]: ``issuer``, ``audiences``, ``jwksUri``, ``jwks``, ``fromHeaders``
  (``name``, ``prefix``), ``fromParams``, ``forwardOriginalToken``

Two kinds of issuer:

- a trust domain's ID (``issuer: spiffe://example.org``): the JWT-SVIDs of that trust
  domain, checked against its JWT bundle, which Tessera already has (its own, or a
  federated one). ``jwksUri`` and ``jwks`` are then refused, and ``audiences`` is
  required (a JWT-SVID is always for an audience). JWT-SVIDs carry no ``iss`` claim, so
  none is checked.
- any other issuer (``https://accounts.example.com``): its keys come from ``jwksUri``
  or inline ``jwks``, exactly one of them. Tessera does not look up an issuer's OpenID
  discovery document by itself.

Example::

    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {name: edge-jwt}
    spec:
      selector: {matchLabels: {istio: ingressgateway}}
      jwtRules:
      - issuer: spiffe://example.org
        audiences: [edge]
      - issuer: https://accounts.example.com
        jwksUri: https://accounts.example.com/.well-known/jwks.json

As in Istio, a request without a token passes (an ``AuthorizationPolicy`` decides
whether it may); a request with a token that fails validation is refused.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, Strict, model_validator

from mesh.fields import Flag, HeaderName, Model, Text, nonempty, unique
from mesh.resources.base import Resource, WorkloadSelector
from sdk.errors import InvalidArgument
from sdk.spiffeid import parse_trust_domain

__all__ = [
    "JWTHeader",
    "JWTRule",
    "RequestAuthentication",
    "RequestAuthenticationSpec",
]

MAX_JWKS_LENGTH = 64 * 1024
_SPIFFE = "spiffe://"


def _check_jwks_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if (
        len(uri) > 2048
        or parts.scheme not in ("https", "http")
        or not parts.hostname
        or any(character.isspace() for character in uri)
    ):
        raise ValueError("must be an https:// (or http://) URL, e.g. https://idp.example.com/jwks")
    return uri


def _check_jwks(text: str) -> str:
    if len(text) > MAX_JWKS_LENGTH:
        raise ValueError(f"must be at most {MAX_JWKS_LENGTH // 1024} KiB")
    try:
        document = json.loads(text)
    except ValueError:
        raise ValueError('must be a JWK Set in JSON ({"keys": [...]})') from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError('must be a JWK Set in JSON with a non-empty "keys" list')
    if not all(isinstance(key, dict) and isinstance(key.get("kty"), str) for key in keys):
        raise ValueError('must be a JWK Set whose keys are objects with a "kty"')
    return text


JwksUri = Annotated[str, Strict(), AfterValidator(_check_jwks_uri)]
Jwks = Annotated[str, Strict(), AfterValidator(_check_jwks)]


class JWTHeader(Model):
    """A header the token is read from, after ``prefix`` (``Bearer ``)."""

    name: HeaderName
    prefix: Annotated[str, Strict()] | None = None


class JWTRule(Model):
    issuer: Text
    audiences: Annotated[tuple[Text, ...], nonempty, unique] | None = None
    jwks_uri: JwksUri | None = None
    jwks: Jwks | None = None
    from_headers: Annotated[tuple[JWTHeader, ...], nonempty] | None = None
    from_params: Annotated[tuple[Text, ...], nonempty, unique] | None = None
    forward_original_token: Flag | None = None

    @property
    def trust_domain(self) -> str | None:
        """The trust domain whose JWT-SVIDs this rule accepts, or None (another issuer)."""
        if self.issuer.startswith(_SPIFFE):
            return self.issuer[len(_SPIFFE) :]
        return None

    @model_validator(mode="after")
    def _check_keys(self) -> Self:
        trust_domain = self.trust_domain
        if trust_domain is not None:
            if "/" in trust_domain:
                raise ValueError(
                    "must have as issuer a trust domain's ID (spiffe://example.org, no "
                    "path) to accept its JWT-SVIDs"
                )
            try:
                parse_trust_domain(trust_domain)
            except InvalidArgument as err:
                raise ValueError(err.message) from None
            if self.jwks_uri is not None or self.jwks is not None:
                raise ValueError(
                    "cannot have jwksUri or jwks with a trust domain as issuer: its "
                    "JWT-SVIDs are checked against the trust domain's own JWT bundle"
                )
            if self.audiences is None:
                raise ValueError(
                    "must have audiences with a trust domain as issuer: a JWT-SVID is "
                    "valid only for the audience it was minted for"
                )
        elif (self.jwks_uri is None) == (self.jwks is None):
            raise ValueError(
                "must have one of jwksUri or jwks: Tessera does not look up an issuer's "
                "keys by itself"
            )
        return self


def _check_issuers(rules: tuple[JWTRule, ...]) -> tuple[JWTRule, ...]:
    issuers: set[str] = set()
    for rule in rules:
        if rule.issuer in issuers:
            raise ValueError(f"has two rules for issuer {rule.issuer}")
        issuers.add(rule.issuer)
    return rules


class RequestAuthenticationSpec(Model):
    selector: WorkloadSelector | None = None
    jwt_rules: Annotated[tuple[JWTRule, ...], nonempty, AfterValidator(_check_issuers)]


class RequestAuthentication(Resource):
    """JWT validation for the selected workloads (typically a gateway)."""

    GROUP: ClassVar[str] = "security.istio.io"
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1", "v1beta1")
    KIND: ClassVar[str] = "RequestAuthentication"

    kind: Literal["RequestAuthentication"]
    spec: RequestAuthenticationSpec
