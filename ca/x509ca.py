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

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from ca.errors import CAError
from ca.keymanager import Signer
from sdk import der
from sdk.errors import FailedPrecondition, InvalidArgument
from sdk.keys import KeyType, PrivateKey, PublicKey, generate_private_key, hash_for
from sdk.peer import trust_domains_named
from sdk.spiffeid import SpiffeId, TrustDomain

DEFAULT_BACKDATE = timedelta(seconds=10)
"""How far an SVID's notBefore lies before its issuance, for clocks a little behind."""

ORGANIZATION = "Tessera"
SERIAL_BITS = 128
_MAX_NAME_ATTRIBUTE = 64  # ub-common-name / ub-organizational-unit-name (RFC 5280)


def random_serial() -> int:
    """A random positive serial number of up to 128 bits (at most 17 DER octets)."""
    while True:
        serial = int.from_bytes(_serial_octets.take(), "big")
        if serial > 0:
            return serial


class _SerialOctets:
    """16 random octets at a time from os.urandom, read 256 serials' worth at once: one
    system call (and one wait to take the GIL back) per batch of SVIDs, not per SVID."""

    SIZE = SERIAL_BITS // 8
    PER_READ = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = bytearray()

    def take(self) -> bytes:
        with self._lock:
            if not self._pool:
                self._pool.extend(os.urandom(self.SIZE * self.PER_READ))
            octets = bytes(self._pool[-self.SIZE :])
            del self._pool[-self.SIZE :]
            return octets

    def forget(self) -> None:
        """In a forked child: never hand out the serials the parent will."""
        self._lock = threading.Lock()
        self._pool = bytearray()


_serial_octets = _SerialOctets()
os.register_at_fork(after_in_child=_serial_octets.forget)


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
    tbs, algorithm, _ = der.sequence_elements(draft.public_bytes(serialization.Encoding.DER))
    signature = signer.sign(draft.tbs_certificate_bytes)
    certificate = x509.load_der_x509_certificate(_signed(tbs, algorithm, signature))
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
    _, algorithm, _ = der.sequence_elements(draft.public_bytes(serialization.Encoding.DER))
    version, subject_der, _, attributes = der.sequence_elements(draft.tbs_certrequest_bytes)
    spki = signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = der.encode(der.SEQUENCE, version + subject_der + spki + attributes)
    signature = signer.sign(info)
    csr = x509.load_der_x509_csr(_signed(info, algorithm, signature))
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
    authority's notAfter, whichever comes first. The certificate is encoded by
    :class:`X509SvidTemplate`; use it directly to keep the DER and skip parsing.
    """
    signed = x509_svid_template(ca_certificate, signer).sign(
        spiffe_id=spiffe_id,
        public_key=public_key,
        now=now,
        ttl=ttl,
        dns_names=dns_names,
        backdate=backdate,
        subject_common_name=subject_common_name,
    )
    return signed.certificate()


@dataclass(frozen=True)
class SignedX509Svid:
    """An X509-SVID as signed: its DER and the fields an issuer records."""

    der: bytes
    serial_number: int
    not_after: datetime
    """notAfter as the certificate states it: UTC, whole seconds."""

    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)


class X509SvidTemplate:
    """What every X509-SVID one authority signs has in common, checked and encoded once.

    The issuer name, the authority key identifier, the constant extensions, the
    signature algorithm, the authority's trust domain and whether ``signer``
    holds the authority's key do not change from one SVID to the next;
    :meth:`sign` encodes only the serial, validity, subject, key, subject key
    identifier and SANs, then signs. The certificate is the one
    ``x509.CertificateBuilder`` would make from the same fields, byte for byte.
    Get templates from :func:`x509_svid_template`, which keeps them.
    """

    def __init__(self, ca_certificate: x509.Certificate, signer: Signer) -> None:
        self.ca_certificate = ca_certificate
        self.signer = signer
        self._trust_domain = _trust_domain_of(ca_certificate)
        self._ca_not_after = ca_certificate.not_valid_after_utc
        self._ca_public_key = ca_certificate.public_key()
        # Raised when signing, after the checks build_x509_svid has always made first.
        self._signer_refusal: InvalidArgument | None = None
        try:
            _require_signer_key(signer, self._ca_public_key, "the signing authority")
        except InvalidArgument as err:
            self._signer_refusal = err
        self._algorithm = _SIGNATURE_ALGORITHMS[signer.key_type]
        self._sign = _signing_function(signer, self._ca_public_key)
        fields = der.sequence_elements(ca_certificate.tbs_certificate_bytes)
        has_version = fields[0][0] == _VERSION_TAG
        self._issuer = fields[5 if has_version else 4]  # the authority's subject, as encoded
        self._authority_key_identifier = _extension(
            _AUTHORITY_KEY_IDENTIFIER_OID,
            critical=False,
            value=_authority_key_identifier(ca_certificate).public_bytes(),
        )

    def sign(
        self,
        *,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        now: datetime,
        ttl: timedelta,
        dns_names: Sequence[str] = (),
        backdate: timedelta = DEFAULT_BACKDATE,
        subject_common_name: str | None = None,
        subject_public_key_info: bytes | None = None,
        serial_number: int | None = None,
    ) -> SignedX509Svid:
        """Sign an X509-SVID; the arguments are :func:`build_x509_svid`'s.

        ``subject_public_key_info`` is ``public_key``'s SubjectPublicKeyInfo DER
        when the caller already has it (a checked CSR does); it is encoded from
        ``public_key`` otherwise. ``serial_number`` (tests only) replaces the
        random serial.
        """
        if not spiffe_id.path:
            raise InvalidArgument(
                f"an X509-SVID needs a SPIFFE ID with a path, not the trust domain ID {spiffe_id}"
            )
        if self._trust_domain is not None and self._trust_domain != spiffe_id.trust_domain.name:
            raise InvalidArgument(
                f"SPIFFE ID {spiffe_id} is not in trust domain {self._trust_domain} of the "
                "signing authority"
            )
        if ttl <= timedelta(0):
            raise InvalidArgument("X509-SVID TTL must be greater than zero")
        if self._signer_refusal is not None:
            raise self._signer_refusal
        not_before = now - backdate
        not_after = min(now + ttl, self._ca_not_after)
        if not_after <= now:
            raise FailedPrecondition(
                f"the signing authority expired at {self._ca_not_after.isoformat()}; "
                "rotate to a new X.509 authority before issuing SVIDs"
            )
        if not_after < not_before:
            raise ValueError("The not valid after date must be after the not valid before date.")
        subject = _SVID_SUBJECT_ORGANIZATION
        if subject_common_name is not None:
            if not subject_common_name or len(subject_common_name) > _MAX_NAME_ATTRIBUTE:
                raise InvalidArgument(
                    f"subject common name must have 1 to {_MAX_NAME_ATTRIBUTE} characters"
                )
            subject += _common_name_rdn(subject_common_name)
        names = der.encode(_URI_NAME, str(spiffe_id).encode("ascii")) + b"".join(
            der.encode(_DNS_NAME, _checked_dns_name(name).encode("ascii")) for name in dns_names
        )
        if subject_public_key_info is None:
            subject_public_key_info = public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        serial = random_serial() if serial_number is None else serial_number
        extensions = (
            _BASIC_CONSTRAINTS
            + (_KEY_USAGE_RSA if isinstance(public_key, rsa.RSAPublicKey) else _KEY_USAGE)
            + _EXTENDED_KEY_USAGE
            + _subject_key_identifier(subject_public_key_info)
            + self._authority_key_identifier
            + _extension(
                _SUBJECT_ALTERNATIVE_NAME_OID,
                critical=False,
                value=der.encode(der.SEQUENCE, names),
            )
        )
        tbs = der.encode(
            der.SEQUENCE,
            _VERSION_3
            + der.encode_integer(serial)
            + self._algorithm
            + self._issuer
            + der.encode(der.SEQUENCE, der.encode_time(not_before) + der.encode_time(not_after))
            + der.encode(der.SEQUENCE, subject)
            + subject_public_key_info
            + der.encode(_EXTENSIONS_TAG, der.encode(der.SEQUENCE, extensions)),
        )
        return SignedX509Svid(
            der=_signed(tbs, self._algorithm, self._sign(tbs)),
            serial_number=serial,
            not_after=not_after.astimezone(UTC).replace(microsecond=0),
        )


_TEMPLATES_KEPT = 8
_templates: OrderedDict[tuple[int, int], X509SvidTemplate] = OrderedDict()
_templates_lock = threading.Lock()


def x509_svid_template(ca_certificate: x509.Certificate, signer: Signer) -> X509SvidTemplate:
    """The template for SVIDs ``signer`` signs under ``ca_certificate``.

    Kept for the last few (certificate, signer) pairs, by object identity: an
    active authority keeps both objects until it rotates.
    """
    key = (id(ca_certificate), id(signer))
    with _templates_lock:
        template = _templates.get(key)
        if (
            template is not None
            and template.ca_certificate is ca_certificate
            and template.signer is signer
        ):
            _templates.move_to_end(key)
            return template
    template = X509SvidTemplate(ca_certificate, signer)
    with _templates_lock:
        _templates[key] = template
        while len(_templates) > _TEMPLATES_KEPT:
            _templates.popitem(last=False)
    return template


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
    """The trust domain named by a certificate's first SPIFFE URI SAN, if it has one."""
    return next(iter(trust_domains_named(certificate)), None)


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


# The X509-SVID fields the template writes itself, in the DER CertificateBuilder writes.

_VERSION_TAG = 0xA0  # [0] EXPLICIT Version
_EXTENSIONS_TAG = 0xA3  # [3] EXPLICIT Extensions
_URI_NAME = 0x86  # GeneralName uniformResourceIdentifier [6] IMPLICIT IA5String
_DNS_NAME = 0x82  # GeneralName dNSName [2] IMPLICIT IA5String
_VERSION_3 = der.encode(_VERSION_TAG, der.encode_integer(2))
_CRITICAL = bytes((0x01, 0x01, 0xFF))  # BOOLEAN TRUE
_COMMON_NAME_OID = der.encode_oid(NameOID.COMMON_NAME.dotted_string)
_SUBJECT_KEY_IDENTIFIER_OID = der.encode_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER.dotted_string)
_AUTHORITY_KEY_IDENTIFIER_OID = der.encode_oid(
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string
)
_SUBJECT_ALTERNATIVE_NAME_OID = der.encode_oid(
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string
)

# Signature AlgorithmIdentifiers: ecdsa-with-SHA256, ecdsa-with-SHA384 (RFC 5758, no
# parameters) and sha256WithRSAEncryption (RFC 4055, NULL parameters), as hash_for picks.
_ECDSA_WITH_SHA256 = der.encode(der.SEQUENCE, der.encode_oid("1.2.840.10045.4.3.2"))
_ECDSA_WITH_SHA384 = der.encode(der.SEQUENCE, der.encode_oid("1.2.840.10045.4.3.3"))
_SHA256_WITH_RSA = der.encode(
    der.SEQUENCE, der.encode_oid("1.2.840.113549.1.1.11") + der.encode(0x05, b"")
)
_SIGNATURE_ALGORITHMS = {
    KeyType.EC_P256: _ECDSA_WITH_SHA256,
    KeyType.EC_P384: _ECDSA_WITH_SHA384,
    KeyType.RSA_2048: _SHA256_WITH_RSA,
    KeyType.RSA_4096: _SHA256_WITH_RSA,
}


def _extension(oid: bytes, *, critical: bool, value: bytes) -> bytes:
    """An Extension: SEQUENCE { extnID, critical (only when TRUE), extnValue }."""
    return der.encode(
        der.SEQUENCE, oid + (_CRITICAL if critical else b"") + der.encode(der.OCTET_STRING, value)
    )


def _constant_extension(extension: x509.ExtensionType, *, critical: bool) -> bytes:
    return _extension(
        der.encode_oid(extension.oid.dotted_string),
        critical=critical,
        value=extension.public_bytes(),
    )


_BASIC_CONSTRAINTS = _constant_extension(
    x509.BasicConstraints(ca=False, path_length=None), critical=True
)
_KEY_USAGE = _constant_extension(_key_usage(digital_signature=True), critical=True)
_KEY_USAGE_RSA = _constant_extension(
    _key_usage(digital_signature=True, key_encipherment=True), critical=True
)
_EXTENDED_KEY_USAGE = _constant_extension(
    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
    critical=False,
)
# The relative distinguished names inside ``O=Tessera``.
_SVID_SUBJECT_ORGANIZATION = der.content_of(
    x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]).public_bytes()
)


def _common_name_rdn(common_name: str) -> bytes:
    # NameAttribute applies cryptography's own limits (at most 64 octets of UTF-8).
    value = x509.NameAttribute(NameOID.COMMON_NAME, common_name).value
    assert isinstance(value, str)
    attribute = _COMMON_NAME_OID + der.encode(der.UTF8_STRING, value.encode("utf-8"))
    return der.encode(der.SET, der.encode(der.SEQUENCE, attribute))


def _subject_key_identifier(subject_public_key_info: bytes) -> bytes:
    """The SubjectKeyIdentifier extension: SHA-1 of the subjectPublicKey bits (RFC 5280
    section 4.2.1.2, method 1), as ``SubjectKeyIdentifier.from_public_key`` computes it."""
    _, subject_public_key = der.sequence_elements(subject_public_key_info)
    key_bits = der.content_of(subject_public_key)[1:]  # past the unused-bits octet
    digest = hashlib.sha1(key_bits, usedforsecurity=False).digest()
    return _extension(
        _SUBJECT_KEY_IDENTIFIER_OID, critical=False, value=der.encode(der.OCTET_STRING, digest)
    )


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


def _signing_function(signer: Signer, public_key: object) -> Callable[[bytes], bytes]:
    """Sign with ``signer``: directly with a local key; through the signer otherwise,
    checking what it returns against ``public_key``."""
    digest = hash_for(signer.key_type)
    local_key = signer.local_private_key()
    if isinstance(local_key, ec.EllipticCurvePrivateKey):
        ec_key, ecdsa = local_key, ec.ECDSA(digest)

        def sign_ec(data: bytes) -> bytes:
            return ec_key.sign(data, ecdsa)

        return sign_ec
    if isinstance(local_key, rsa.RSAPrivateKey):
        rsa_key, pkcs1 = local_key, padding.PKCS1v15()

        def sign_rsa(data: bytes) -> bytes:
            return rsa_key.sign(data, pkcs1, digest)

        return sign_rsa

    def sign_remotely(data: bytes) -> bytes:
        signature = signer.sign(data)
        _require_valid_signature(signer, public_key, data, signature, digest)
        return signature

    return sign_remotely


def _check_signature(certificate: x509.Certificate, signer: Signer) -> None:
    algorithm = certificate.signature_hash_algorithm
    assert isinstance(algorithm, hashes.SHA256 | hashes.SHA384)
    _require_valid_signature(
        signer,
        signer.public_key(),
        certificate.tbs_certificate_bytes,
        certificate.signature,
        algorithm,
    )


def _require_valid_signature(
    signer: Signer,
    public_key: object,
    data: bytes,
    signature: bytes,
    digest: hashes.SHA256 | hashes.SHA384,
) -> None:
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(digest))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), digest)
        else:
            raise InvalidSignature("not an EC or RSA key")
    except Exception as err:
        raise CAError(
            f"key manager signer {signer.key_id!r} returned a signature that does not verify "
            "with its public key; check the key manager"
        ) from err


def _signed(to_be_signed: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """A signed X.509 structure: SEQUENCE { to-be-signed, algorithm, BIT STRING signature }."""
    return der.encode(
        der.SEQUENCE,
        to_be_signed + algorithm + der.encode(der.BIT_STRING, b"\x00" + signature),
    )
