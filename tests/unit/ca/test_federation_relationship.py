"""What an operator asks for when federating is checked with sentences that say what to do."""

from __future__ import annotations

from typing import Any

import pytest
from spiffe import TrustDomain

from ca.datastore.records import NewFederationRelationship
from ca.federation.relationship import check_bundle, parse_given_bundle, validate_relationship
from sdk.errors import InvalidArgument
from tests.unit.ca.federation_helpers import authority, bundle

OWN = TrustDomain("example.org")
PARTNER = TrustDomain("partner.org")
EXAMPLE_URL = "write it as https://HOST[:PORT][/PATH], e.g. https://partner.example:8443"


def validated(**changes: Any) -> NewFederationRelationship:
    values: dict[str, Any] = {
        "trust_domain": "partner.org",
        "bundle_endpoint_url": "https://partner.example:8443/bundle",
        "profile": "https_spiffe",
        "endpoint_spiffe_id": "spiffe://partner.org/tessera/server",
        **changes,
    }
    return validate_relationship(OWN, **values)


def refusal(**changes: Any) -> str:
    with pytest.raises(InvalidArgument) as refused:
        validated(**changes)
    return refused.value.message


def test_an_https_spiffe_relationship():
    assert validated(trust_domain="spiffe://partner.org") == NewFederationRelationship(
        trust_domain="partner.org",
        bundle_endpoint_url="https://partner.example:8443/bundle",
        profile="https_spiffe",
        endpoint_spiffe_id="spiffe://partner.org/tessera/server",
    )


def test_an_https_web_relationship_has_no_endpoint_id():
    relationship = validated(profile="https_web", endpoint_spiffe_id=None)

    assert relationship.profile == "https_web"
    assert relationship.endpoint_spiffe_id is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trust_domain": "example.org"},
         "example.org is this server's own trust domain; federate with another one"),
        ({"trust_domain": "Partner.org"},
         "trust domain 'Partner.org' is not valid: trust domain must be lower case; use "
         "lower-case letters, digits, '.', '-' and '_', e.g. example.org"),
        ({"bundle_endpoint_url": "http://partner.example/bundle"},
         "bundle endpoint URL 'http://partner.example/bundle' must start with https:// (both "
         "profiles fetch the bundle over TLS)"),
        ({"bundle_endpoint_url": "partner.example:8443"},
         "bundle endpoint URL 'partner.example:8443' must start with https:// (both "
         "profiles fetch the bundle over TLS)"),
        ({"bundle_endpoint_url": "https:///bundle"},
         f"bundle endpoint URL 'https:///bundle' has no host; {EXAMPLE_URL}"),
        ({"bundle_endpoint_url": "https://partner.example:99999"},
         f"bundle endpoint URL 'https://partner.example:99999' is malformed; {EXAMPLE_URL}"),
        ({"bundle_endpoint_url": "https://partner.example/a b"},
         f"bundle endpoint URL 'https://partner.example/a b' contains white space; "
         f"{EXAMPLE_URL}"),
        ({"bundle_endpoint_url": "https://user:secret@partner.example"},
         "bundle endpoint URL 'https://user:secret@partner.example' must not carry a user "
         "name or password"),
        ({"bundle_endpoint_url": "https://p.example/" + "a" * 2048},
         "bundle endpoint URL is longer than 2048 characters"),
        ({"profile": "https"},
         "bundle endpoint profile 'https' is not one of https_web (a web PKI certificate) or "
         "https_spiffe (the server's SPIFFE ID)"),
        ({"endpoint_spiffe_id": None},
         "profile https_spiffe needs the endpoint SPIFFE ID (--endpoint-spiffe-id): the ID "
         "the endpoint's certificate must carry, e.g. spiffe://partner.org/tessera/server for "
         "a Tessera server (spiffe://partner.org/spire/server for SPIRE)"),
        ({"endpoint_spiffe_id": "spiffe://partner.org/"},
         "endpoint SPIFFE ID 'spiffe://partner.org/' is not valid: path cannot contain "
         "empty segments; expected spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web"),
        ({"endpoint_spiffe_id": "spiffe://example.org/tessera/server"},
         "endpoint SPIFFE ID spiffe://example.org/tessera/server is not in trust domain "
         "partner.org; use an ID of the form spiffe://partner.org/..."),
        ({"profile": "https_web"},
         "an endpoint SPIFFE ID is only used with profile https_spiffe; an https_web endpoint "
         "is authenticated by its web PKI certificate, so leave it out"),
    ],
)
def test_refusals_say_what_to_change(changes: dict[str, Any], message: str):
    assert refusal(**changes) == message


def test_a_given_bundle_may_be_spiffe_json_or_pem():
    document = bundle("partner.org", 0, sequence=7, jwt_slots=(0,))

    from_json = parse_given_bundle(PARTNER, b"\n  " + document.to_spiffe_json())
    from_pem = parse_given_bundle(PARTNER, document.to_pem())

    assert from_json == document
    assert from_pem.x509_authorities == document.x509_authorities
    assert from_pem.sequence == 0


def test_a_given_bundle_without_authorities_is_refused():
    with pytest.raises(InvalidArgument) as refused:
        parse_given_bundle(PARTNER, b'{"keys": [], "spiffe_sequence": 1}')

    assert refused.value.message == "the given bundle for partner.org holds no authorities"


def test_a_bundle_whose_authorities_name_another_trust_domain_is_refused():
    other, _ = authority("other.org")
    mixed = bundle("partner.org", 0)
    mixed = type(mixed)(PARTNER, (*mixed.x509_authorities, other))

    with pytest.raises(InvalidArgument) as refused:
        check_bundle(mixed, source="the bundle from https://p.example")

    assert refused.value.message == (
        "the bundle from https://p.example is for trust domain other.org, not partner.org: "
        f"its authority {other.subject.rfc4514_string()!r} carries spiffe://other.org"
    )


def test_a_bad_given_bundle_says_what_is_malformed():
    with pytest.raises(InvalidArgument) as refused:
        parse_given_bundle(PARTNER, b"not a bundle")

    assert refused.value.message.startswith("bundle is not PEM certificates")
