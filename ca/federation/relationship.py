"""Federation relationships as an operator asks for them, validated with sentences
that say what to change.

    relationship = validate_relationship(
        own_trust_domain,
        trust_domain="partner.org",
        bundle_endpoint_url="https://partner.example:8443",
        profile="https_spiffe",
        endpoint_spiffe_id="spiffe://partner.org/tessera/server",
    )
    bundle = parse_given_bundle(TrustDomain("partner.org"), data)   # PEM or SPIFFE JSON
    check_bundle(bundle, source="the given bundle")

A relationship names the other trust domain, the HTTPS URL of its bundle
endpoint and the endpoint's *profile*: ``https_web`` (the endpoint has a web
PKI certificate for its host name) or ``https_spiffe`` (the endpoint presents
an X509-SVID, which must chain to the stored bundle of that trust domain and
carry ``endpoint_spiffe_id``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ca.datastore.records import (
    BUNDLE_ENDPOINT_PROFILES,
    HTTPS_SPIFFE,
    HTTPS_WEB,
    NewFederationRelationship,
)
from sdk.bundle import TrustBundle
from sdk.errors import InvalidArgument
from sdk.peer import trust_domains_named
from sdk.spiffeid import TrustDomain, parse_spiffe_id, parse_trust_domain, require_member

MAX_URL_LENGTH = 2048

__all__ = [
    "BUNDLE_ENDPOINT_PROFILES",
    "HTTPS_SPIFFE",
    "HTTPS_WEB",
    "check_bundle",
    "parse_given_bundle",
    "validate_relationship",
]


def validate_relationship(
    own_trust_domain: TrustDomain,
    *,
    trust_domain: str,
    bundle_endpoint_url: str,
    profile: str,
    endpoint_spiffe_id: str | None,
) -> NewFederationRelationship:
    """The relationship to store; InvalidArgument naming the first thing wrong."""
    federated = parse_trust_domain(trust_domain)
    if federated == own_trust_domain:
        raise InvalidArgument(
            f"{federated.name} is this server's own trust domain; federate with another one"
        )
    url = _check_url(bundle_endpoint_url)
    if profile not in BUNDLE_ENDPOINT_PROFILES:
        raise InvalidArgument(
            f"bundle endpoint profile {profile!r} is not one of https_web (a web PKI "
            "certificate) or https_spiffe (the server's SPIFFE ID)"
        )
    endpoint_id: str | None = None
    if profile == HTTPS_SPIFFE:
        if not endpoint_spiffe_id:
            raise InvalidArgument(
                "profile https_spiffe needs the endpoint SPIFFE ID (--endpoint-spiffe-id): "
                "the ID the endpoint's certificate must carry, e.g. "
                f"spiffe://{federated.name}/tessera/server for a Tessera server "
                f"(spiffe://{federated.name}/spire/server for SPIRE)"
            )
        parsed = parse_spiffe_id(endpoint_spiffe_id, what="endpoint SPIFFE ID")
        require_member(parsed, federated, what="endpoint SPIFFE ID")
        endpoint_id = str(parsed)
    elif endpoint_spiffe_id:
        raise InvalidArgument(
            "an endpoint SPIFFE ID is only used with profile https_spiffe; an https_web "
            "endpoint is authenticated by its web PKI certificate, so leave it out"
        )
    return NewFederationRelationship(
        trust_domain=federated.name,
        bundle_endpoint_url=url,
        profile=profile,
        endpoint_spiffe_id=endpoint_id,
    )


def parse_given_bundle(trust_domain: TrustDomain, data: bytes) -> TrustBundle:
    """A bundle an operator gives: SPIFFE bundle JSON, or PEM certificates."""
    if data.lstrip().startswith(b"{"):
        bundle = TrustBundle.from_spiffe_json(trust_domain, data)
    else:
        bundle = TrustBundle.from_pem(trust_domain, data)
    check_bundle(bundle, source="the given bundle")
    return bundle


def check_bundle(bundle: TrustBundle, *, source: str) -> None:
    """Refuse a bundle with no authorities, or whose authorities name another trust
    domain in their SPIFFE ID (CA certificates of a trust domain carry its ID)."""
    name = bundle.trust_domain.name
    if not bundle.x509_authorities and not bundle.jwt_authorities:
        raise InvalidArgument(f"{source} for {name} holds no authorities")
    for certificate in bundle.x509_authorities:
        for other in trust_domains_named(certificate):
            if other != name:
                raise InvalidArgument(
                    f"{source} is for trust domain {other}, not {name}: its authority "
                    f"{certificate.subject.rfc4514_string()!r} carries spiffe://{other}"
                )


def _check_url(url: str) -> str:
    example = "write it as https://HOST[:PORT][/PATH], e.g. https://partner.example:8443"
    if len(url) > MAX_URL_LENGTH:
        raise InvalidArgument(f"bundle endpoint URL is longer than {MAX_URL_LENGTH} characters")
    if url != url.strip() or any(c.isspace() for c in url):
        raise InvalidArgument(f"bundle endpoint URL {url!r} contains white space; {example}")
    try:
        parts = urlsplit(url)
        _ = parts.port  # reading the port is what checks it
    except ValueError:
        raise InvalidArgument(f"bundle endpoint URL {url!r} is malformed; {example}") from None
    if parts.scheme != "https":
        raise InvalidArgument(
            f"bundle endpoint URL {url!r} must start with https:// (both profiles fetch the "
            "bundle over TLS)"
        )
    if not parts.hostname:
        raise InvalidArgument(f"bundle endpoint URL {url!r} has no host; {example}")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(
            f"bundle endpoint URL {url!r} must not carry a user name or password"
        )
    return url
