"""Certificate signing requests: made by agents, checked by the server.

The agent keeps each workload key and sends only a PKCS#10 request::

    der = build_csr(private_key, SpiffeId("spiffe://example.org/web"), ["web.example.org"])

The server checks the request against the registration entry before it
signs anything; every refusal is an InvalidArgument that says why::

    csr = parse_csr(der)
    public_key = check_csr(csr, spiffe_id=entry_id, dns_names=entry_dns_names)
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from spiffe import SpiffeId

from ca.errors import InvalidArgument
from ca.keys import PrivateKey, PublicKey

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
    try:
        public_key = csr.public_key()
        signature_valid = csr.is_signature_valid
        extensions = csr.extensions
    except (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension) as err:
        raise InvalidArgument(f"CSR cannot be read: {err}") from None
    if not signature_valid:
        raise InvalidArgument("CSR signature does not verify with the CSR's public key")
    checked_key = _check_public_key(public_key)

    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris and uris != [str(spiffe_id)]:
        raise InvalidArgument(
            f"CSR URI SANs {uris} do not match the SPIFFE ID {spiffe_id}; a CSR may name "
            "only the SPIFFE ID of the entry it is for"
        )
    not_allowed = sorted(set(san.get_values_for_type(x509.DNSName)) - set(dns_names))
    if not_allowed:
        allowed = ", ".join(dns_names) if dns_names else "none"
        raise InvalidArgument(
            f"CSR asks for DNS names {', '.join(not_allowed)} that the entry for {spiffe_id} "
            f"does not allow (allowed: {allowed})"
        )
    others = sorted(
        {
            type(name).__name__
            for name in san
            if not isinstance(name, x509.UniformResourceIdentifier | x509.DNSName)
        }
    )
    if others:
        raise InvalidArgument(
            f"CSR carries subject alternative names of type {', '.join(others)}; "
            "only a URI (the SPIFFE ID) and DNS names are allowed"
        )

    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise InvalidArgument("CSR asks for a CA certificate (cA=true); SVIDs are never CAs")
    return checked_key


def build_csr(private_key: PrivateKey, spiffe_id: SpiffeId, dns_names: Sequence[str] = ()) -> bytes:
    """A DER PKCS#10 request for ``spiffe_id`` (and ``dns_names``) signed by ``private_key``."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names.extend(x509.DNSName(name) for name in dns_names)
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )
    csr = builder.sign(private_key, _digest_for(private_key))
    return csr.public_bytes(serialization.Encoding.DER)


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


def _digest_for(private_key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()
