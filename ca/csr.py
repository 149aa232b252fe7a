"""Certificate signing requests: checked by the server.

Agents make them with :func:`sdk.csr.build_csr` (re-exported here). The server
checks the request against the registration entry before it signs anything; every
refusal is an InvalidArgument that says why::

    csr = parse_csr(der)
    public_key = check_csr(csr, spiffe_id=entry_id, dns_names=entry_dns_names)

Issuance uses :func:`checked_csr`, which also hands over the key's
SubjectPublicKeyInfo DER so the certificate can carry it without re-encoding::

    checked = checked_csr(csr, spiffe_id=entry_id, dns_names=entry_dns_names)
    checked.subject_public_key_info
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from sdk import der
from sdk.csr import build_csr
from sdk.errors import InvalidArgument
from sdk.keys import PublicKey
from sdk.spiffeid import SpiffeId

__all__ = [
    "MAX_CSR_BYTES",
    "MIN_RSA_BITS",
    "CheckedCsr",
    "build_csr",
    "check_csr",
    "checked_csr",
    "parse_csr",
]

MAX_CSR_BYTES = 16384
MIN_RSA_BITS = 2048
_PEM_MARKER = b"-----BEGIN"


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PKCS#10 request in DER or PEM; InvalidArgument if too large or malformed."""
    if len(data) > MAX_CSR_BYTES:
        raise InvalidArgument(f"CSR is {len(data)} bytes; the limit is {MAX_CSR_BYTES} bytes")
    try:
        if data.lstrip().startswith(_PEM_MARKER):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise InvalidArgument("CSR is not a valid PKCS#10 request in DER or PEM") from None


@dataclass(frozen=True)
class CheckedCsr:
    """What :func:`checked_csr` found in a request it accepts."""

    public_key: PublicKey
    subject_public_key_info: bytes
    """The key's SubjectPublicKeyInfo in DER, exactly as a certificate carries it."""


def check_csr(
    csr: x509.CertificateSigningRequest,
    *,
    spiffe_id: SpiffeId,
    dns_names: Sequence[str] = (),
) -> PublicKey:
    """Check ``csr`` may become an SVID for ``spiffe_id``; return its public key.

    The signature must verify; the key must be EC P-256/P-384 or RSA of at
    least 2048 bits; URI SANs, if any, must be exactly ``spiffe_id``; DNS SANs
    must be among ``dns_names``; no other SAN types; never ``cA=true``.
    """
    return checked_csr(csr, spiffe_id=spiffe_id, dns_names=dns_names).public_key


def checked_csr(
    csr: x509.CertificateSigningRequest,
    *,
    spiffe_id: SpiffeId,
    dns_names: Sequence[str] = (),
) -> CheckedCsr:
    """:func:`check_csr`, returning the key's SubjectPublicKeyInfo DER along with it."""
    request_info = csr.tbs_certrequest_bytes
    try:
        public_key = csr.public_key()
        signature_valid = _signature_valid(csr, public_key, request_info)
        extensions = csr.extensions
    except (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension) as err:
        raise InvalidArgument(f"CSR cannot be read: {err}") from None
    if not signature_valid:
        raise InvalidArgument("CSR signature does not verify with the CSR's public key")
    checked_key = _check_public_key(public_key)

    san: x509.SubjectAlternativeName | None = None
    constraints: x509.BasicConstraints | None = None
    for extension in extensions:
        if isinstance(extension.value, x509.SubjectAlternativeName):
            san = extension.value
        elif isinstance(extension.value, x509.BasicConstraints):
            constraints = extension.value
    if san is not None:
        _check_san(san, spiffe_id, dns_names)
    if constraints is not None and constraints.ca:
        raise InvalidArgument("CSR asks for a CA certificate (cA=true); SVIDs are never CAs")
    return CheckedCsr(checked_key, _subject_public_key_info(request_info, checked_key))


def _check_san(
    san: x509.SubjectAlternativeName, spiffe_id: SpiffeId, dns_names: Sequence[str]
) -> None:
    uris: list[str] = []
    requested_dns: list[str] = []
    others: set[str] = set()
    for name in san:
        if isinstance(name, x509.UniformResourceIdentifier):
            uris.append(name.value)
        elif isinstance(name, x509.DNSName):
            requested_dns.append(name.value)
        else:
            others.add(type(name).__name__)
    if uris and uris != [str(spiffe_id)]:
        raise InvalidArgument(
            f"CSR URI SANs {uris} do not match the SPIFFE ID {spiffe_id}; a CSR may name "
            "only the SPIFFE ID of the entry it is for"
        )
    not_allowed = sorted(set(requested_dns) - set(dns_names))
    if not_allowed:
        allowed = ", ".join(dns_names) if dns_names else "none"
        raise InvalidArgument(
            f"CSR asks for DNS names {', '.join(not_allowed)} that the entry for {spiffe_id} "
            f"does not allow (allowed: {allowed})"
        )
    if others:
        raise InvalidArgument(
            f"CSR carries subject alternative names of type {', '.join(sorted(others))}; "
            "only a URI (the SPIFFE ID) and DNS names are allowed"
        )


# The usual signature algorithms, verified with the already loaded key; made once
# (constructing ec.ECDSA is not free).
_ECDSA_SIGNATURES = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512()),
}
_RSA_PKCS1_SIGNATURES: dict[x509.ObjectIdentifier, hashes.HashAlgorithm] = {
    SignatureAlgorithmOID.RSA_WITH_SHA256: hashes.SHA256(),
    SignatureAlgorithmOID.RSA_WITH_SHA384: hashes.SHA384(),
    SignatureAlgorithmOID.RSA_WITH_SHA512: hashes.SHA512(),
}
_PKCS1 = padding.PKCS1v15()


def _signature_valid(
    csr: x509.CertificateSigningRequest, public_key: object, request_info: bytes
) -> bool:
    """``csr.is_signature_valid``, with the key already loaded where the request uses one
    of the usual algorithms (``is_signature_valid`` would load it a second time)."""
    algorithm = csr.signature_algorithm_oid
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            ecdsa = _ECDSA_SIGNATURES.get(algorithm)
            if ecdsa is not None:
                public_key.verify(csr.signature, request_info, ecdsa)
                return True
        elif isinstance(public_key, rsa.RSAPublicKey):
            digest = _RSA_PKCS1_SIGNATURES.get(algorithm)
            if digest is not None:
                public_key.verify(csr.signature, request_info, _PKCS1, digest)
                return True
    except InvalidSignature:
        return False
    return csr.is_signature_valid


# SubjectPublicKeyInfo up to the uncompressed point (RFC 5480), as certificates carry it.
_EC_SPKI_PREFIXES = {
    256: bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200"),
    384: bytes.fromhex("3076301006072a8648ce3d020106052b81040022036200"),
}
_UNCOMPRESSED_POINT = 0x04


def _subject_public_key_info(request_info: bytes, public_key: PublicKey) -> bytes:
    """The request's SubjectPublicKeyInfo DER when it is already in the form a certificate
    carries (an EC key as an uncompressed point); otherwise the key re-encoded."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        prefix = _EC_SPKI_PREFIXES[public_key.key_size]
        # CertificationRequestInfo: version, subject, subjectPKInfo, attributes.
        spki = der.sequence_element(request_info, 2)
        if (
            len(spki) == len(prefix) + 1 + 2 * ((public_key.key_size + 7) // 8)
            and spki.startswith(prefix)
            and spki[len(prefix)] == _UNCOMPRESSED_POINT
        ):
            return spki
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_public_key(public_key: object) -> PublicKey:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
            return public_key
        raise InvalidArgument(
            f"CSR key is on EC curve {public_key.curve.name}; use P-256 (secp256r1) or "
            "P-384 (secp384r1)"
        )
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size >= MIN_RSA_BITS:
            return public_key
        raise InvalidArgument(
            f"CSR RSA key has {public_key.key_size} bits; at least {MIN_RSA_BITS} are required"
        )
    raise InvalidArgument(
        f"CSR key type {type(public_key).__name__} is not supported; use EC P-256, EC P-384 "
        f"or RSA of at least {MIN_RSA_BITS} bits"
    )
