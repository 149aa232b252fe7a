"""Trust bundles: a trust domain's X.509 and JWT authorities, in every form they travel in.

::

    bundle = TrustBundle(trust_domain, (root,), {"k1": jwt_key}, sequence=3)
    bundle.to_pem()            # X.509 authorities as PEM (``bundle show --format pem``)
    bundle.x509_der()          # concatenated DER (the Workload API ``bundle`` field)
    bundle.to_spiffe_json()    # the SPIFFE bundle JWKS (federation, ``--format spiffe``)
    bundle.jwks_json()         # JWKS of the JWT authorities (Workload API JWT bundles)
    TrustBundle.from_spiffe_json(trust_domain, data) == bundle

The SPIFFE bundle format: ``keys`` holds ``use: x509-svid`` entries with one
``x5c`` certificate and no ``kid``, and ``use: jwt-svid`` entries with a
``kid``; ``spiffe_sequence`` and ``spiffe_refresh_hint`` (seconds) sit beside
it. Entries of other uses are skipped, as the standard asks.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sdk.errors import InvalidArgument
from sdk.keys import PublicKey, public_jwk, public_key_from_jwk
from sdk.spiffeid import TrustDomain

if TYPE_CHECKING:  # the spiffe package's bundle types, only where a bundle is handed to it
    from spiffe import JwtBundle, X509Bundle

__all__ = [
    "DEFAULT_REFRESH_HINT",
    "JWT_SVID_USE",
    "MAX_BUNDLE_BYTES",
    "X509_SVID_USE",
    "TrustBundle",
]

X509_SVID_USE = "x509-svid"
JWT_SVID_USE = "jwt-svid"
DEFAULT_REFRESH_HINT = 300
MAX_BUNDLE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class TrustBundle:
    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...]
    jwt_authorities: Mapping[str, PublicKey] = field(default_factory=dict)  # kid -> key
    sequence: int = 0
    refresh_hint: int = DEFAULT_REFRESH_HINT  # seconds

    def __post_init__(self) -> None:
        # Frozen all the way down: callers cannot change the keys behind our back.
        object.__setattr__(self, "x509_authorities", tuple(self.x509_authorities))
        object.__setattr__(self, "jwt_authorities", MappingProxyType(dict(self.jwt_authorities)))

    def to_pem(self) -> bytes:
        return b"".join(
            cert.public_bytes(serialization.Encoding.PEM) for cert in self.x509_authorities
        )

    def x509_der(self) -> bytes:
        """The X.509 authorities as concatenated DER."""
        return b"".join(
            cert.public_bytes(serialization.Encoding.DER) for cert in self.x509_authorities
        )

    def to_spiffe_json(self) -> bytes:
        keys = [
            public_jwk(
                _certificate_key(cert),
                use=X509_SVID_USE,
                x5c=[cert.public_bytes(serialization.Encoding.DER)],
            )
            for cert in self.x509_authorities
        ]
        keys.extend(self._jwt_jwks())
        document = {
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint,
        }
        return json.dumps(document, indent=2).encode() + b"\n"

    def jwks_json(self) -> bytes:
        """A JWKS of the JWT authorities alone, each with its ``kid``."""
        return json.dumps({"keys": self._jwt_jwks()}, indent=2).encode() + b"\n"

    @classmethod
    def from_spiffe_json(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        """Parse a SPIFFE bundle JWKS; InvalidArgument naming what is malformed."""
        if len(data) > MAX_BUNDLE_BYTES:
            raise InvalidArgument(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            raise InvalidArgument("bundle is not JSON; expected a SPIFFE bundle (JWKS)") from None
        if not isinstance(document, dict):
            raise InvalidArgument("bundle is not a JSON object; expected a SPIFFE bundle (JWKS)")
        entries = document.get("keys", [])
        if not isinstance(entries, list):
            raise InvalidArgument("bundle member 'keys' is not a list")
        certificates: list[x509.Certificate] = []
        jwt_keys: dict[str, PublicKey] = {}
        for index, entry in enumerate(entries):
            where = f"bundle key {index}"
            if not isinstance(entry, dict):
                raise InvalidArgument(f"{where} is not a JSON object")
            use = entry.get("use")
            if use == X509_SVID_USE:
                certificates.append(_x509_entry(entry, where))
            elif use == JWT_SVID_USE:
                kid = entry.get("kid")
                if not isinstance(kid, str) or not kid:
                    raise InvalidArgument(f"{where} (jwt-svid) has no key id (kid)")
                if kid in jwt_keys:
                    raise InvalidArgument(f"{where} repeats key id {kid!r}")
                jwt_keys[kid] = _jwk_key(entry, where)
            elif not isinstance(use, str):
                raise InvalidArgument(f"{where} has no 'use'; expected x509-svid or jwt-svid")
        return cls(
            trust_domain=trust_domain,
            x509_authorities=tuple(certificates),
            jwt_authorities=jwt_keys,
            sequence=_count(document, "spiffe_sequence", 0),
            refresh_hint=_count(document, "spiffe_refresh_hint", DEFAULT_REFRESH_HINT),
        )

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        """A bundle of the X.509 authorities in PEM ``data``; InvalidArgument if there are none."""
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise InvalidArgument(
                "bundle is not PEM certificates; expected one or more "
                "'-----BEGIN CERTIFICATE-----' blocks"
            ) from None
        for cert in certificates:
            _certificate_key(cert)
        return cls(trust_domain=trust_domain, x509_authorities=tuple(certificates))

    def to_x509_bundle(self) -> X509Bundle:
        from spiffe import X509Bundle

        return X509Bundle(self.trust_domain, set(self.x509_authorities))

    def to_jwt_bundle(self) -> JwtBundle:
        from spiffe import JwtBundle

        return JwtBundle(self.trust_domain, dict(self.jwt_authorities))

    def _jwt_jwks(self) -> list[dict[str, Any]]:
        return [
            public_jwk(key, kid=kid, use=JWT_SVID_USE) for kid, key in self.jwt_authorities.items()
        ]


def _x509_entry(entry: Mapping[str, Any], where: str) -> x509.Certificate:
    chain = entry.get("x5c")
    if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
        raise InvalidArgument(f"{where} (x509-svid) must carry exactly one certificate in x5c")
    try:
        der = base64.b64decode(chain[0], validate=True)
        certificate = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{where} (x509-svid) x5c is not a base64 DER certificate") from None
    key = _certificate_key(certificate)
    if "kty" in entry and _jwk_key(entry, where) != key:
        raise InvalidArgument(f"{where} (x509-svid) key does not match its x5c certificate")
    return certificate


def _jwk_key(entry: Mapping[str, Any], where: str) -> PublicKey:
    try:
        return public_key_from_jwk(entry)
    except InvalidArgument as err:
        raise InvalidArgument(f"{where}: {err.message}") from None


def _certificate_key(certificate: x509.Certificate) -> PublicKey:
    try:
        key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidArgument(
            f"certificate {certificate.subject.rfc4514_string()!r} does not hold an EC or RSA key"
        )
    return key


def _count(document: Mapping[str, Any], name: str, default: int) -> int:
    value = document.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"bundle member {name!r} is not a non-negative integer")
    return value
