"""Authorizers allow by returning and refuse by raising, naming the peer, rule and reason."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, TrustDomain

from sdk.authorize import (
    Authorizer,
    authorize_all,
    authorize_any,
    authorize_id,
    authorize_member_of,
    authorize_one_of,
    authorize_policy,
)
from sdk.errors import AuthenticationError, AuthorizationError, NotAnX509Svid, SdkError
from sdk.peer import (
    spiffe_id_from_certificate,
    spiffe_id_from_pem,
    trust_domains_named,
    uri_sans,
)
from sdk.policy import Policy
from tests.support.pki import self_signed

WEB = SpiffeId("spiffe://example.org/web")
API = SpiffeId("spiffe://example.org/api")
PARTNER = SpiffeId("spiffe://partner.org/web")


def refusal(authorizer: Authorizer, peer: SpiffeId) -> AuthorizationError:
    with pytest.raises(AuthorizationError) as refused:
        authorizer(peer)
    return refused.value


def test_authorize_any() -> None:
    assert authorize_any()(PARTNER) is None


def test_authorize_id() -> None:
    authorizer = authorize_id("spiffe://example.org/api")

    assert authorizer(API) is None
    error = refusal(authorizer, WEB)
    assert str(error) == (
        "spiffe://example.org/web refused by authorize_id: expected spiffe://example.org/api"
    )
    assert (error.peer_id, error.rule, error.reason) == (
        WEB,
        "authorize_id",
        "expected spiffe://example.org/api",
    )
    assert error.status == 403


def test_authorize_one_of() -> None:
    authorizer = authorize_one_of(API, "spiffe://example.org/db")

    assert authorizer(API) is None
    assert str(refusal(authorizer, WEB)) == (
        "spiffe://example.org/web refused by authorize_one_of: "
        "expected one of spiffe://example.org/api, spiffe://example.org/db"
    )


def test_authorize_member_of() -> None:
    authorizer = authorize_member_of(TrustDomain("example.org"))

    assert authorizer(WEB) is None
    assert str(refusal(authorizer, PARTNER)) == (
        "spiffe://partner.org/web refused by authorize_member_of: "
        "expected a member of trust domain example.org"
    )


def test_authorize_all_raises_the_first_refusal() -> None:
    authorizer = authorize_all(authorize_member_of("example.org"), authorize_id(API))

    assert authorizer(API) is None
    assert refusal(authorizer, PARTNER).rule == "authorize_member_of"
    assert refusal(authorizer, WEB).rule == "authorize_id"


def test_authorize_policy() -> None:
    policy = Policy.from_dict(
        {"allow": [{"name": "web-reads", "ids": [str(WEB)], "methods": ["GET"]}]},
        source="policy.toml",
    )

    assert authorize_policy(policy, method="GET", path="/x")(WEB) is None
    error = refusal(authorize_policy(policy), WEB)  # at the handshake: no method yet
    assert str(error) == (
        "spiffe://example.org/web refused by policy rule 'default-deny': no allow rule matches it"
    )
    assert error.rule == "policy rule 'default-deny'"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: authorize_id("spiffe://Example.org/api"),
            "SPIFFE ID 'spiffe://Example.org/api' is not valid: trust domain must be lower "
            "case; expected spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web",
        ),
        (lambda: authorize_one_of(), "authorize_one_of needs at least one SPIFFE ID"),
        (
            lambda: authorize_member_of("example.org/x"),
            "trust domain 'example.org/x' is not valid: contains disallowed characters; use "
            "lower-case letters, digits, '.', '-' and '_', e.g. example.org",
        ),
    ],
    ids=["bad-id", "no-ids", "bad-trust-domain"],
)
def test_bad_arguments(make: object, message: str) -> None:
    with pytest.raises(SdkError) as refused:
        make()  # type: ignore[operator]

    assert str(refused.value) == message


# -- a peer certificate's SPIFFE ID -------------------------------------------------------


def certificate(uris: list[str], *, ca: bool = False) -> x509.Certificate:
    """A certificate with ``uris`` as its URI SANs (none: no SAN), a CA's if ``ca``."""
    return self_signed(uris=uris, ca=ca).certificate


def test_the_spiffe_id_of_a_certificate() -> None:
    pem = certificate([str(WEB)]).public_bytes(serialization.Encoding.PEM)

    assert spiffe_id_from_pem(pem) == WEB


@pytest.mark.parametrize(
    ("cert", "message"),
    [
        (
            certificate([]),
            "the peer's certificate is not an X509-SVID: it has 0 URI SANs, an X509-SVID has "
            "exactly one",
        ),
        (
            certificate([str(WEB), str(API)]),
            "the peer's certificate is not an X509-SVID: it has 2 URI SANs, an X509-SVID has "
            "exactly one",
        ),
        (
            certificate(["https://example.org/web"]),
            "the peer's certificate is not an X509-SVID: the URI SAN of the peer's certificate "
            "'https://example.org/web' is not valid: does not start with 'spiffe://'; expected "
            "spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web",
        ),
        (
            certificate(["spiffe://example.org"]),
            "the peer's certificate is not an X509-SVID: spiffe://example.org has no path (only "
            "signing certificates name a bare trust domain)",
        ),
        (
            certificate([str(WEB)], ca=True),
            "the peer's certificate for spiffe://example.org/web is a CA certificate, not an "
            "X509-SVID leaf",
        ),
    ],
    ids=["no-uri", "two-uris", "not-spiffe", "no-path", "ca"],
)
def test_certificates_that_are_not_x509_svids(cert: x509.Certificate, message: str) -> None:
    with pytest.raises(AuthenticationError) as refused:
        spiffe_id_from_certificate(cert)

    assert str(refused.value) == message
    assert refused.value.status == 401


@pytest.mark.parametrize(
    ("uris", "ca", "problem", "peer_id"),
    [
        ([], False, "uri_sans", None),
        ([str(WEB), str(API)], False, "uri_sans", None),
        (["https://example.org/web"], False, "spiffe_id", None),
        (["spiffe://example.org"], False, "path", SpiffeId("spiffe://example.org")),
        ([str(WEB)], True, "ca", WEB),
    ],
    ids=["no-uri", "two-uris", "not-spiffe", "no-path", "ca"],
)
def test_the_refusal_names_the_rule_broken_for_callers_with_their_own_words(
    uris: list[str], ca: bool, problem: str, peer_id: SpiffeId | None
) -> None:
    with pytest.raises(NotAnX509Svid) as refused:
        spiffe_id_from_certificate(certificate(uris, ca=ca))

    assert (refused.value.problem, refused.value.uri_sans) == (problem, uris)
    assert refused.value.peer_id == peer_id


def test_any_certificate_naming_one_spiffe_id_with_leaf_false() -> None:
    signing = certificate(["spiffe://example.org"], ca=True)

    assert spiffe_id_from_certificate(signing, leaf=False) == SpiffeId("spiffe://example.org")
    assert spiffe_id_from_certificate(certificate([str(WEB)], ca=True), leaf=False) == WEB
    with pytest.raises(NotAnX509Svid):
        spiffe_id_from_certificate(certificate([str(WEB), str(API)]), leaf=False)
    with pytest.raises(NotAnX509Svid):
        spiffe_id_from_certificate(certificate(["https://example.org/web"]), leaf=False)


def test_uri_sans_and_the_trust_domains_they_name() -> None:
    uris = ["https://example.org/web", "spiffe://example.org", "spiffe://partner.org/api"]

    assert uri_sans(certificate(uris)) == uris
    assert uri_sans(certificate([])) == []
    assert trust_domains_named(certificate(uris)) == ["example.org", "partner.org"]
    assert trust_domains_named(certificate(["https://example.org/web"])) == []
