from __future__ import annotations

import base64

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sdk.errors import InvalidArgument
from sdk.keys import (
    KeyType,
    generate_private_key,
    hash_for,
    jwt_algorithm,
    key_type_of,
    parse_key_type,
    private_key_to_pkcs8_der,
    public_jwk,
    public_key_from_jwk,
)


def test_parse_key_type():
    assert parse_key_type("ec-p256") is KeyType.EC_P256
    assert parse_key_type("RSA-4096") is KeyType.RSA_4096
    with pytest.raises(InvalidArgument) as err:
        parse_key_type("ed25519")
    assert err.value.message == (
        "key type 'ed25519' is not supported; use one of ec-p256, ec-p384, rsa-2048, rsa-4096"
    )


@pytest.mark.parametrize(
    ("key_type", "algorithm", "digest"),
    [
        (KeyType.EC_P256, "ES256", hashes.SHA256),
        (KeyType.EC_P384, "ES384", hashes.SHA384),
        (KeyType.RSA_2048, "RS256", hashes.SHA256),
        (KeyType.RSA_4096, "RS256", hashes.SHA256),
    ],
)
def test_key_type_properties(key_type, algorithm, digest, key_pool):
    key = key_pool(key_type)
    assert key_type_of(key.public_key()) is key_type
    assert key_type_of(key) is key_type
    assert jwt_algorithm(key_type) == algorithm
    assert isinstance(hash_for(key_type), digest)


def test_generate_private_key_makes_the_asked_type():
    assert isinstance(generate_private_key(KeyType.EC_P384), ec.EllipticCurvePrivateKey)
    assert key_type_of(generate_private_key(KeyType.EC_P384)) is KeyType.EC_P384


def test_key_type_of_refuses_other_keys():
    with pytest.raises(InvalidArgument, match="EC keys on curve secp521r1 are not supported"):
        key_type_of(ec.generate_private_key(ec.SECP521R1()).public_key())
    with pytest.raises(InvalidArgument, match="Ed25519PublicKey keys are not supported"):
        key_type_of(ed25519.Ed25519PrivateKey.generate().public_key())
    with pytest.raises(InvalidArgument, match="RSA keys of 3072 bits are not supported"):
        key_type_of(rsa.generate_private_key(65537, 3072).public_key())


@pytest.mark.parametrize("key_type", list(KeyType))
def test_jwk_round_trip_and_pyjwt_agrees(key_type, key_pool):
    public_key = key_pool(key_type).public_key()
    jwk = public_jwk(public_key, kid="k1", use="jwt-svid")
    assert jwk["kid"] == "k1" and jwk["use"] == "jwt-svid"
    assert public_key_from_jwk(jwk) == public_key
    assert jwt.PyJWK(jwk).key.public_numbers() == public_key.public_numbers()


def test_ec_jwk_members_are_fixed_length():
    jwk = public_jwk(generate_private_key(KeyType.EC_P384).public_key())
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-384"
    assert len(base64.urlsafe_b64decode(jwk["x"] + "==")) == 48
    assert len(base64.urlsafe_b64decode(jwk["y"] + "==")) == 48
    assert "kid" not in jwk and "use" not in jwk and "=" not in jwk["x"]


def test_jwk_x5c_is_standard_base64_der():
    jwk = public_jwk(generate_private_key(KeyType.EC_P256).public_key(), x5c=[b"\xfb\xff"])
    assert jwk["x5c"] == ["+/8="]


def test_public_key_from_jwk_refuses_bad_keys():
    good = public_jwk(generate_private_key(KeyType.EC_P256).public_key())
    with pytest.raises(InvalidArgument, match="JWK key type \\(kty\\) 'oct' is not supported"):
        public_key_from_jwk({"kty": "oct", "k": "AAAA"})
    with pytest.raises(InvalidArgument, match="JWK curve 'P-192' is not supported"):
        public_key_from_jwk({**good, "crv": "P-192"})
    with pytest.raises(InvalidArgument, match="JWK member 'x' has 31 bytes; 32 are required"):
        public_key_from_jwk({**good, "x": base64.urlsafe_b64encode(b"x" * 31).decode()})
    with pytest.raises(InvalidArgument, match="JWK point is not on curve P-256"):
        public_key_from_jwk({**good, "y": good["x"]})
    with pytest.raises(InvalidArgument, match="JWK member 'y' is missing or not a string"):
        public_key_from_jwk({"kty": "EC", "crv": "P-256", "x": good["x"]})
    small = rsa.generate_private_key(65537, 1024).public_key()
    with pytest.raises(InvalidArgument, match="has 1024 bits; at least 2048 are required"):
        public_key_from_jwk(public_jwk(small))


def test_private_key_to_pkcs8_der(key_pool):
    key = key_pool(KeyType.EC_P256)
    der = private_key_to_pkcs8_der(key)
    loaded = serialization.load_der_private_key(der, password=None)
    assert loaded.private_numbers() == key.private_numbers()
