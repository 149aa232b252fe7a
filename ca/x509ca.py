"""X.509 authorities and X509-SVIDs, as the SPIFFE X509-SVID standard shapes them.

Every certificate is signed through a :class:`~ca.keymanager.Signer`, so the
key may live in this process or in a remote key manager::

    root = build_ca_certificate(
        trust_domain=TrustDomain("example.org"), public_key=signer.public_key(),
        signer=signer, issuer=None, not_before=now, not_after=now + timedelta(days=1),
    )
    svid = build_x509_svid(
        spiffe_id=SpiffeId("spiffe://example.org/web"), public_key=workload_key.public_key(),
        ca_certificate=root, signer=signer, now=now, ttl=timedelta(hours=1),
    )

Authorities carry ``cA=true``, keyCertSign and cRLSign and the trust domain's
SPIFFE ID (no path) as their only URI SAN. SVIDs carry exactly one URI SAN,
``cA=false``, digitalSignature (plus keyEncipherment for RSA keys only),
serverAuth and clientAuth, are back-dated by :data:`DEFAULT_BACKDATE` and never
outlive the authority that signed them.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from spiffe import SpiffeId, TrustDomain

from ca.errors import CAError, FailedPrecondition, InvalidArgument
from ca.keymanager import Signer
from ca.keys import KeyType, PrivateKey, PublicKey, generate_private_key, hash_for

DEFAULT_BACKDATE = timedelta(seconds=10)
"""How far an SVID's notBefore lies before its issuance, for clocks a little behind."""

ORGANIZATION = "Tessera"
SERIAL_BITS = 128
_MAX_NAME_ATTRIBUTE = 64  # ub-common-name / ub-organizational-unit-name (RFC 5280)


def random_serial() -> int:
    """A random positive serial number of up to 128 bits (at most 17 DER octets)."""
    while True:
        serial = secrets.randbits(SERIAL_BITS)
        if serial > 0:
            return serial


def sign_certificate(builder: x509.CertificateBuilder, signer: Signer) -> x509.Certificate:
    """Sign ``builder`` with ``signer``'s key, local or remote.

    A local key signs directly. For a remote key, the to-be-signed certificate
    is built with a throwaway key of the same type (so its signature algorithm
    is right), the signer signs those bytes and the certificate is assembled
    around its signature.
    """
    key_type = signer.key_type
    local_key = signer.local_private_key()
    if local_key is not None:
        return builder.sign(local_key, hash_for(key_type), rsa_padding=_rsa_padding(local_key))
    draft = builder.sign(_throwaway_key(key_type), hash_for(key_type))
    tbs, algorithm, _ = _der_sequence_elements(draft.public_bytes(serialization.Encoding.DER))
    signature = signer.sign(draft.tbs_certificate_bytes)
    certificate = x509.load_der_x509_certificate(
        _der_element(0x30, tbs + algorithm + _der_element(0x03, b"\x00" + signature))
    )
    _check_signature(certificate, signer)
    return certificate


def build_csr_with_signer(
    subject: x509.Name, signer: Signer
) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for ``signer``'s public key, signed by ``signer``, local or remote.

    For a remote key the request is drafted with a throwaway key of the same
    type, its public key swapped for the signer's, and the signer signs the
    resulting request info (as :func:`sign_certificate` does for certificates).
    """
    key_type = signer.key_type
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    local_key = signer.local_private_key()
    if local_key is not None:
        return builder.sign(local_key, hash_for(key_type), rsa_padding=_rsa_padding(local_key))
    draft = builder.sign(_throwaway_key(key_type), hash_for(key_type))
    _, algorithm, _ = _der_sequence_elements(draft.public_bytes(serialization.Encoding.DER))
    version, subject_der, _, attributes = _der_sequence_elements(draft.tbs_certrequest_bytes)
    spki = signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = _der_element(0x30, version + subject_der + spki + attributes)
    signature = signer.sign(info)
    csr = x509.load_der_x509_csr(
        _der_element(0x30, info + algorithm + _der_element(0x03, b"\x00" + signature))
    )
    if not csr.is_signature_valid:
        raise CAError(
            f"key manager signer {signer.key_id!r} returned a signature that does not verify "
            "with its public key; check the key manager"
        )
    return csr


def build_ca_certificate(
    *,
    trust_domain: TrustDomain,
    public_key: PublicKey,
    signer: Signer,
    issuer: x509.Certificate | None,
    not_before: datetime,
    not_after: datetime,
    serial: int | None = None,
) -> x509.Certificate:
    """An X.509 authority for ``trust_domain`` holding ``public_key``.

    ``issuer`` None makes it self-signed (then ``signer`` must hold
    ``public_key``'s private key); otherwise ``signer`` holds the issuer's key
    and notAfter is capped at the issuer's.
    """
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    subject = _ca_subject(trust_domain, ski)
    if issuer is None:
        _require_signer_key(signer, public_key, "the new self-signed authority")
        issuer_name = subject
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    else:
        _require_signer_key(signer, issuer.public_key(), "the issuer certificate")
        issuer_name = issuer.subject
        aki = _authority_key_identifier(issuer)
        not_after = min(not_after, issuer.not_valid_after_utc)
    if not_after <= not_before:
        raise InvalidArgument(
            f"authority lifetime is empty: notBefore {not_before.isoformat()} is not before "
            f"notAfter {not_after.isoformat()}"
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial if serial is not None else random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain.name}")]
            ),
            critical=False,
        )
    )
    return sign_certificate(builder, signer)


def build_x509_svid(
    *,
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    ca_certificate: x509.Certificate,
    signer: Signer,
    now: datetime,
    ttl: timedelta,
    dns_names: Sequence[str] = (),
    backdate: timedelta = DEFAULT_BACKDATE,
    subject_common_name: str | None = None,
) -> x509.Certificate:
    """An X509-SVID for ``spiffe_id`` over ``public_key``, signed by ``ca_certificate``'s key.

    notBefore is ``now - backdate``; notAfter is ``now + ttl`` or the
    authority's notAfter, whichever comes first.
    """
    if not spiffe_id.path:
        raise InvalidArgument(
            f"an X509-SVID needs a SPIFFE ID with a path, not the trust domain ID {spiffe_id}"
        )
    ca_trust_domain = _trust_domain_of(ca_certificate)
    if ca_trust_domain is not None and ca_trust_domain != spiffe_id.trust_domain.name:
        raise InvalidArgument(
            f"SPIFFE ID {spiffe_id} is not in trust domain {ca_trust_domain} of the signing "
            "authority"
        )
    if ttl <= timedelta(0):
        raise InvalidArgument("X509-SVID TTL must be greater than zero")
    _require_signer_key(signer, ca_certificate.public_key(), "the signing authority")
    not_before = now - backdate
    not_after = min(now + ttl, ca_certificate.not_valid_after_utc)
    if not_after <= now:
        raise FailedPrecondition(
            f"the signing authority expired at {ca_certificate.not_valid_after_utc.isoformat()}; "
            "rotate to a new X.509 authority before issuing SVIDs"
        )
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if subject_common_name is not None:
        if not subject_common_name or len(subject_common_name) > _MAX_NAME_ATTRIBUTE:
            raise InvalidArgument(
                f"subject common name must have 1 to {_MAX_NAME_ATTRIBUTE} characters"
            )
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, subject_common_name))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names.extend(x509.DNSName(_checked_dns_name(name)) for name in dns_names)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(
                digital_signature=True,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(ca_certificate), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )
    return sign_certificate(builder, signer)


# --- subject names and extensions -------------------------------------------------------


def _ca_subject(trust_domain: TrustDomain, ski: x509.SubjectKeyIdentifier) -> x509.Name:
    """``O=Tessera, OU=<trust domain>, CN=authority <key id>``: unique per key."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(
                NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain.name[:_MAX_NAME_ATTRIBUTE]
            ),
            x509.NameAttribute(NameOID.COMMON_NAME, f"authority {ski.digest[:8].hex()}"),
        ]
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(_public_key(issuer))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _trust_domain_of(certificate: x509.Certificate) -> str | None:
    """The trust domain named by a certificate's SPIFFE URI SAN, if it has one."""
    try:
        san = certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        ).value
    except x509.ExtensionNotFound:
        return None
    assert isinstance(san, x509.SubjectAlternativeName)
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").split("/", 1)[0]
    return None


def _checked_dns_name(name: str) -> str:
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or not name.isascii()
        or any(not label or len(label) > 63 for label in labels)
        or any(not (c.isalnum() or c in "-*") for c in name.replace(".", ""))
    ):
        raise InvalidArgument(
            f"DNS name {name!r} is not valid; use an ASCII host name such as web.example.org"
        )
    return name


# --- signing ----------------------------------------------------------------------------


def _public_key(certificate: x509.Certificate) -> PublicKey:
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidArgument("certificate key is not an EC or RSA key")
    return key


def _require_signer_key(signer: Signer, public_key: object, what: str) -> None:
    if signer.public_key() != public_key:
        raise InvalidArgument(
            f"signer key {signer.key_id!r} does not hold the private key of {what}"
        )


def _rsa_padding(key: PrivateKey) -> padding.PKCS1v15 | None:
    return padding.PKCS1v15() if isinstance(key, rsa.RSAPrivateKey) else None


_throwaway_keys: dict[KeyType, PrivateKey] = {}
_throwaway_lock = threading.Lock()


def _throwaway_key(key_type: KeyType) -> PrivateKey:
    """A key of ``key_type`` whose signatures are thrown away; made once per type."""
    with _throwaway_lock:
        key = _throwaway_keys.get(key_type)
        if key is None:
            key = _throwaway_keys[key_type] = generate_private_key(key_type)
        return key


def _check_signature(certificate: x509.Certificate, signer: Signer) -> None:
    public_key = signer.public_key()
    algorithm = certificate.signature_hash_algorithm
    assert algorithm is not None
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(
                certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(algorithm)
            )
        else:
            public_key.verify(
                certificate.signature,
                certificate.tbs_certificate_bytes,
                padding.PKCS1v15(),
                algorithm,
            )
    except Exception as err:
        raise CAError(
            f"key manager signer {signer.key_id!r} returned a signature that does not verify "
            "with its public key; check the key manager"
        ) from err


def _der_element(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        header = bytes([tag, length])
    else:
        size = (length.bit_length() + 7) // 8
        header = bytes([tag, 0x80 | size]) + length.to_bytes(size, "big")
    return header + content


def _der_sequence_elements(der: bytes) -> list[bytes]:
    """The encoded elements (tag, length and content) inside a DER SEQUENCE."""
    content, rest = _der_read(der, 0)
    if rest != len(der) or der[0] != 0x30:
        raise ValueError("not a single DER SEQUENCE")
    elements = []
    position = content[0]
    while position < content[1]:
        (_, end), after = _der_read(der, position)
        elements.append(der[position:end])
        position = after
    return elements


def _der_read(der: bytes, position: int) -> tuple[tuple[int, int], int]:
    """((content start, content end), next position) of the element at ``position``."""
    first = der[position + 1]
    if first < 0x80:
        start, length = position + 2, first
    else:
        size = first & 0x7F
        start = position + 2 + size
        length = int.from_bytes(der[position + 2 : start], "big")
    return (start, start + length), start + length
