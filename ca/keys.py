"""Moved to :mod:`sdk.keys`; this module re-exports it for code written against the old path."""

from sdk.keys import (
    RSA_PUBLIC_EXPONENT,
    KeyType,
    PrivateKey,
    PublicKey,
    generate_private_key,
    hash_for,
    jwt_algorithm,
    key_type_of,
    parse_key_type,
    private_key_to_pkcs8_der,
    public_jwk,
    public_key_from_jwk,
)

__all__ = [
    "RSA_PUBLIC_EXPONENT",
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "generate_private_key",
    "hash_for",
    "jwt_algorithm",
    "key_type_of",
    "parse_key_type",
    "private_key_to_pkcs8_der",
    "public_jwk",
    "public_key_from_jwk",
]
