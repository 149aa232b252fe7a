from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from spiffe import JwtBundle, X509Bundle

from sdk.bundle import TrustBundle
from sdk.errors import InvalidArgument
from sdk.keys import KeyType
from tests.unit.ca.conftest import TRUST_DOMAIN


@pytest.fixture
def bundle(make_root, key_pool) -> TrustBundle:
    first, _ = make_root(KeyType.EC_P256, 0)
    second, _ = make_root(KeyType.RSA_2048, 0)
    return TrustBundle(
        trust_domain=TRUST_DOMAIN,
        x509_authorities=(first, second),
        jwt_authorities={
            "k1": key_pool(KeyType.EC_P256, 1).public_key(),
            "k2": key_pool(KeyType.RSA_2048, 1).public_key(),
        },
        sequence=7,
        refresh_hint=60,
    )


def test_spiffe_json_round_trip(bundle):
    data = bundle.to_spiffe_json()
    assert TrustBundle.from_spiffe_json(TRUST_DOMAIN, data) == bundle


def test_spiffe_json_follows_the_bundle_format(bundle):
    document = json.loads(bundle.to_spiffe_json())
    assert document["spiffe_sequence"] == 7
    assert document["spiffe_refresh_hint"] == 60
    x509_keys = [key for key in document["keys"] if key["use"] == "x509-svid"]
    jwt_keys = [key for key in document["keys"] if key["use"] == "jwt-svid"]
    assert len(x509_keys) == 2 and len(jwt_keys) == 2
    assert all(len(key["x5c"]) == 1 and "kid" not in key for key in x509_keys)
    assert [key["kid"] for key in jwt_keys] == ["k1", "k2"]
    assert all("x5c" not in key for key in jwt_keys)


def test_pem_and_der_round_trip_and_the_spiffe_package_parses_them(bundle):
    from_pem = TrustBundle.from_pem(TRUST_DOMAIN, bundle.to_pem())
    assert from_pem.x509_authorities == bundle.x509_authorities
    assert from_pem.jwt_authorities == {}
    parsed = X509Bundle.parse_raw(TRUST_DOMAIN, bundle.x509_der())
    assert parsed.x509_authorities == set(bundle.x509_authorities)
    assert X509Bundle.parse(TRUST_DOMAIN, bundle.to_pem()) == bundle.to_x509_bundle()


def test_the_spiffe_package_parses_the_jwks(bundle):
    parsed = JwtBundle.parse(TRUST_DOMAIN, bundle.jwks_json())
    assert set(parsed.jwt_authorities) == {"k1", "k2"}
    for kid, key in bundle.jwt_authorities.items():
        assert parsed.get_jwt_authority(kid).public_numbers() == key.public_numbers()
    assert parsed == bundle.to_jwt_bundle()
    assert json.loads(bundle.jwks_json())["keys"][0]["use"] == "jwt-svid"


def test_an_empty_bundle(bundle):
    empty = TrustBundle(TRUST_DOMAIN, ())
    assert TrustBundle.from_spiffe_json(TRUST_DOMAIN, empty.to_spiffe_json()) == empty
    assert JwtBundle.parse(TRUST_DOMAIN, empty.jwks_json()).jwt_authorities == {}


def test_the_bundle_cannot_be_changed_through_the_dict_it_was_given(key_pool):
    keys = {"k1": key_pool(KeyType.EC_P256).public_key()}
    bundle = TrustBundle(TRUST_DOMAIN, (), keys)
    keys["k2"] = keys["k1"]
    assert list(bundle.jwt_authorities) == ["k1"]
    with pytest.raises(TypeError):
        bundle.jwt_authorities["k3"] = keys["k1"]  # type: ignore[index]


def test_keys_of_unknown_use_are_skipped(bundle):
    document = json.loads(bundle.to_spiffe_json())
    document["keys"].append({"use": "future-svid", "kty": "whatever"})
    assert TrustBundle.from_spiffe_json(TRUST_DOMAIN, json.dumps(document).encode()) == bundle


def _mangled(bundle, change) -> str:
    document = json.loads(bundle.to_spiffe_json())
    change(document)
    with pytest.raises(InvalidArgument) as err:
        TrustBundle.from_spiffe_json(TRUST_DOMAIN, json.dumps(document).encode())
    return err.value.message


def test_malformed_spiffe_bundles_are_refused(bundle):
    for data, message in [
        (b"{", "bundle is not JSON; expected a SPIFFE bundle (JWKS)"),
        (b"[]", "bundle is not a JSON object; expected a SPIFFE bundle (JWKS)"),
        (b'{"keys": {}}', "bundle member 'keys' is not a list"),
        (b'{"keys": [1]}', "bundle key 0 is not a JSON object"),
        (b'{"keys": [{"kty": "EC"}]}', "bundle key 0 has no 'use'; expected x509-svid or jwt-svid"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            TrustBundle.from_spiffe_json(TRUST_DOMAIN, data)
        assert err.value.message == message

    def two_certs(document):
        document["keys"][0]["x5c"] *= 2

    assert _mangled(bundle, two_certs) == (
        "bundle key 0 (x509-svid) must carry exactly one certificate in x5c"
    )

    def bad_cert(document):
        document["keys"][0]["x5c"] = ["bm90IGEgY2VydA=="]

    assert _mangled(bundle, bad_cert) == (
        "bundle key 0 (x509-svid) x5c is not a base64 DER certificate"
    )

    def swapped_key(document):
        document["keys"][0]["x"], document["keys"][0]["y"] = (
            document["keys"][2]["x"],
            document["keys"][2]["y"],
        )

    assert _mangled(bundle, swapped_key) == (
        "bundle key 0 (x509-svid) key does not match its x5c certificate"
    )

    def no_kid(document):
        del document["keys"][2]["kid"]

    assert _mangled(bundle, no_kid) == "bundle key 2 (jwt-svid) has no key id (kid)"

    def repeated_kid(document):
        document["keys"][3]["kid"] = "k1"

    assert _mangled(bundle, repeated_kid) == "bundle key 3 repeats key id 'k1'"

    def bad_jwk(document):
        document["keys"][2]["crv"] = "P-192"

    assert _mangled(bundle, bad_jwk) == (
        "bundle key 2: JWK curve 'P-192' is not supported; use P-256, P-384 or P-521"
    )

    def negative_sequence(document):
        document["spiffe_sequence"] = -1

    assert _mangled(bundle, negative_sequence) == (
        "bundle member 'spiffe_sequence' is not a non-negative integer"
    )


def test_from_pem_refuses_non_certificates(bundle):
    with pytest.raises(InvalidArgument) as err:
        TrustBundle.from_pem(TRUST_DOMAIN, b"not pem")
    assert err.value.message == (
        "bundle is not PEM certificates; expected one or more '-----BEGIN CERTIFICATE-----' blocks"
    )
    der = bundle.x509_authorities[0].public_bytes(serialization.Encoding.DER)
    with pytest.raises(InvalidArgument):
        TrustBundle.from_pem(TRUST_DOMAIN, der)
