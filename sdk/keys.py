"""Key types, key generation and the JWK form of public keys.

Tessera's authorities use one of four key types, named as in the CLI
(``--ca-key-type``)::

    key_type = parse_key_type("ec-p256")
    private_key = generate_private_key(key_type)
    jwk = public_jwk(private_key.public_key(), kid="k1", use="jwt-svid")
    assert public_key_from_jwk(jwk) == private_key.public_key()
    jwt_algorithm(key_type)   # "ES256"

Workload keys travel over the Workload API as unencrypted PKCS#8 DER
(:func:`private_key_to_pkcs8_der`).

Tessera-internal: used by the server, the agent and the sidecar, not part of the SDK's
public API (it is not in ``sdk.__all__``) and may change without notice.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sdk.errors import InvalidArgument

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

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

RSA_PUBLIC_EXPONENT = 65537


class KeyType(StrEnum):
    """The key types an authority (and a workload) key may have."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_4096 = "rsa-4096"


_ALLOWED = ", ".join(key_type.value for key_type in KeyType)

# JWK "crv" names (RFC 7518 section 6.2.1.1) and their curves.
_JWK_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_CURVE_JWK_NAMES = {type(curve): name for name, curve in _JWK_CURVES.items()}


def parse_key_type(value: str) -> KeyType:
    """Parse a key type name such as ``ec-p256``; raise InvalidArgument naming the choices."""
    try:
        return KeyType(value.strip().lower())
    except ValueError:
        raise InvalidArgument(
            f"key type {value!r} is not supported; use one of {_ALLOWED}"
        ) from None


def generate_private_key(key_type: KeyType) -> PrivateKey:
    """A fresh private key of ``key_type``."""
    match key_type:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA_2048:
            return rsa.generate_private_key(RSA_PUBLIC_EXPONENT, 2048)
        case KeyType.RSA_4096:
            return rsa.generate_private_key(RSA_PUBLIC_EXPONENT, 4096)


def key_type_of(public_key: object) -> KeyType:
    """The KeyType of a public (or private) key; InvalidArgument for any other key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if isinstance(public_key.curve, ec.SECP256R1):
            return KeyType.EC_P256
        if isinstance(public_key.curve, ec.SECP384R1):
            return KeyType.EC_P384
        raise InvalidArgument(
            f"EC keys on curve {public_key.curve.name} are not supported; use one of {_ALLOWED}"
        )
    if isinstance(public_key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if public_key.key_size == 2048:
            return KeyType.RSA_2048
        if public_key.key_size == 4096:
            return KeyType.RSA_4096
        raise InvalidArgument(
            f"RSA keys of {public_key.key_size} bits are not supported; use one of {_ALLOWED}"
        )
    raise InvalidArgument(
        f"{type(public_key).__name__} keys are not supported; use one of {_ALLOWED}"
    )


def jwt_algorithm(key_type: KeyType) -> str:
    """The JWS ``alg`` a key of this type signs with: ES256, ES384 or RS256."""
    match key_type:
        case KeyType.EC_P256:
            return "ES256"
        case KeyType.EC_P384:
            return "ES384"
        case KeyType.RSA_2048 | KeyType.RSA_4096:
            return "RS256"


def hash_for(key_type: KeyType) -> hashes.SHA256 | hashes.SHA384:
    """The digest used with keys of this type: SHA-384 for P-384, SHA-256 otherwise."""
    if key_type is KeyType.EC_P384:
        return hashes.SHA384()
    return hashes.SHA256()


def public_jwk(
    public_key: PublicKey,
    *,
    kid: str | None = None,
    use: str | None = None,
    x5c: Sequence[bytes] = (),
) -> dict[str, Any]:
    """The RFC 7517 JWK of ``public_key``; ``x5c`` holds DER certificates."""
    jwk: dict[str, Any] = {}
    if use is not None:
        jwk["use"] = use
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve_name = _CURVE_JWK_NAMES.get(type(public_key.curve))
        if curve_name is None:
            raise InvalidArgument(f"EC curve {public_key.curve.name} has no JWK name")
        size = _coordinate_size(public_key.curve)
        numbers = public_key.public_numbers()
        jwk["kty"] = "EC"
        jwk["crv"] = curve_name
        jwk["x"] = _b64url_uint(numbers.x, size)
        jwk["y"] = _b64url_uint(numbers.y, size)
    elif isinstance(public_key, rsa.RSAPublicKey):
        rsa_numbers = public_key.public_numbers()
        jwk["kty"] = "RSA"
        jwk["n"] = _b64url_uint(rsa_numbers.n)
        jwk["e"] = _b64url_uint(rsa_numbers.e)
    else:
        raise InvalidArgument(f"{type(public_key).__name__} keys have no JWK form here")
    if kid is not None:
        jwk["kid"] = kid
    if x5c:
        jwk["x5c"] = [base64.b64encode(der).decode("ascii") for der in x5c]
    return jwk


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """The public key a JWK describes (EC P-256/P-384/P-521 or RSA); InvalidArgument if bad."""
    kty = jwk.get("kty")
    if kty == "EC":
        curve_name = jwk.get("crv")
        curve = _JWK_CURVES.get(curve_name) if isinstance(curve_name, str) else None
        if curve is None:
            raise InvalidArgument(
                f"JWK curve {curve_name!r} is not supported; use P-256, P-384 or P-521"
            )
        size = _coordinate_size(curve)
        x = _jwk_uint(jwk, "x", exact_size=size)
        y = _jwk_uint(jwk, "y", exact_size=size)
        try:
            return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        except ValueError:
            raise InvalidArgument(f"JWK point is not on curve {curve_name}") from None
    if kty == "RSA":
        n = _jwk_uint(jwk, "n")
        e = _jwk_uint(jwk, "e")
        if n.bit_length() < 2048:
            raise InvalidArgument(
                f"JWK RSA modulus has {n.bit_length()} bits; at least 2048 are required"
            )
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as err:
            raise InvalidArgument(f"JWK RSA key is not valid: {err}") from None
    raise InvalidArgument(f"JWK key type (kty) {kty!r} is not supported; use EC or RSA")


def private_key_to_pkcs8_der(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 DER, the form the Workload API hands keys to workloads in."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _coordinate_size(curve: ec.EllipticCurve) -> int:
    return (curve.key_size + 7) // 8


def _b64url_uint(value: int, size: int | None = None) -> str:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    raw = value.to_bytes(length, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _jwk_uint(jwk: Mapping[str, Any], member: str, *, exact_size: int | None = None) -> int:
    value = jwk.get(member)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"JWK member {member!r} is missing or not a string")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"JWK member {member!r} is not base64url") from None
    if exact_size is not None and len(raw) != exact_size:
        raise InvalidArgument(
            f"JWK member {member!r} has {len(raw)} bytes; {exact_size} are required"
        )
    return int.from_bytes(raw, "big")
