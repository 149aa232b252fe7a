"""The test CA: every certificate a test needs, made in code for the run (nothing checked in
expires).

    ca = TestCA("example.org")                               # a root for a trust domain
    svid = ca.issue_x509_svid("spiffe://example.org/web")    # a spiffe.X509Svid, key included
    source = StaticX509Source(svid, [ca.bundle()])
    chained = ca.intermediate().issue_x509_svid(WEB)         # chain: leaf, intermediate
    lapsed = ca.issue_x509_svid(WEB, not_before=now - 2 * HOUR, ttl=HOUR)   # expired
    forged = TestCA("partner.test").issue_x509_svid(WEB)     # the wrong trust domain's CA

The CA signs whatever it is asked to. A certificate that is no X509-SVID comes from
``issue_certificate`` (or ``self_signed``) with keyword options: no SAN (no ``uris``), two URI
SANs, a URI that is no SPIFFE ID, the CA flag (``ca=True``), no keyUsage. The other PKIs tests
need (a node CA for x509pop, a web CA for https_web federation, an organisation's root above an
upstream authority) are ``TestCA.named("Node Root CA")``.

Keys are ECDSA P-256 unless asked otherwise. ``KEYS`` (the ``key_pool`` fixture) hands out one
key per (type, slot) for the whole run, since RSA keys take a while to make. The writers turn
certificates and keys into PEM or DER bytes and files.

Fixtures (``tests/conftest.py``): ``test_ca`` (example.org) and ``partner_test_ca``
(partner.test), new for each test; ``key_pool``, one for the session.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import SpiffeId, TrustDomain, X509Bundle, X509Svid

from sdk.keys import KeyType
from workload_api.identity import X509SvidMaterial

__all__ = [
    "CA_TTL",
    "KEYS",
    "SVID_TTL",
    "IssuedCertificate",
    "KeyPool",
    "TestCA",
    "der",
    "key_der",
    "key_pem",
    "new_key",
    "pem",
    "self_signed",
    "write_key_pem",
    "write_pem",
    "x509_svid_material",
]

PrivateKey = CertificateIssuerPrivateKeyTypes
PublicKey = CertificatePublicKeyTypes

CA_TTL = timedelta(days=1)
SVID_TTL = timedelta(hours=1)
_CA_BACKDATE = timedelta(minutes=1)
_LEAF_BACKDATE = timedelta(seconds=10)
_SVID_EXTENDED_KEY_USAGE = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


# -- keys ---------------------------------------------------------------------------------

_KEY_MAKERS: dict[str, Callable[[], PrivateKey]] = {
    KeyType.EC_P256.value: lambda: ec.generate_private_key(ec.SECP256R1()),
    KeyType.EC_P384.value: lambda: ec.generate_private_key(ec.SECP384R1()),
    KeyType.RSA_2048.value: lambda: rsa.generate_private_key(65537, 2048),
    KeyType.RSA_4096.value: lambda: rsa.generate_private_key(65537, 4096),
    # Kinds Tessera refuses, for the tests that show it does.
    "ec-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "rsa-1024": lambda: rsa.generate_private_key(65537, 1024),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


def new_key(key_type: KeyType | str = KeyType.EC_P256) -> PrivateKey:
    """A fresh private key of one of Tessera's key types, or ec-p521, rsa-1024 or ed25519."""
    try:
        make = _KEY_MAKERS[str(key_type)]
    except KeyError:
        known = ", ".join(_KEY_MAKERS)
        raise ValueError(f"no test key type {key_type!r}; known: {known}") from None
    return make()


class KeyPool:
    """One private key per (type, slot) for the whole run: RSA keys take a while to make.

    The same arguments give the same key; a test that needs two different keys of one type
    asks for two slots.
    """

    def __init__(self) -> None:
        self._keys: dict[tuple[str, int], PrivateKey] = {}

    def __call__(self, key_type: KeyType | str = KeyType.EC_P256, slot: int = 0) -> PrivateKey:
        index = (str(key_type), slot)
        if index not in self._keys:
            self._keys[index] = new_key(key_type)
        return self._keys[index]


KEYS = KeyPool()


# -- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate, its private key, and the CA certificates between it and its root."""

    certificate: x509.Certificate
    key: PrivateKey
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def chain(self) -> list[x509.Certificate]:
        """Leaf first, then the intermediates (what a TLS peer presents)."""
        return [self.certificate, *self.intermediates]


class TestCA:
    """A certificate authority that signs whatever a test asks for.

    ``TestCA("example.org")`` is the root of a trust domain: its certificate names
    spiffe://example.org, and its subject is unique, so two CAs of one trust domain (a
    rotation) never share a name. ``TestCA.named(...)`` is a root of some other PKI, its subject
    ``CN=<name>``. ``intermediate()`` makes a CA under this one.
    """

    __test__ = False  # not a test class, despite its name

    trust_domain: TrustDomain | None
    parent: TestCA | None
    key: PrivateKey
    certificate: x509.Certificate

    def __init__(
        self,
        trust_domain: str | None = "example.org",
        *,
        common_name: str | None = None,
        parent: TestCA | None = None,
        key: PrivateKey | None = None,
        key_type: KeyType | str = KeyType.EC_P256,
        not_before: datetime | None = None,
        ttl: timedelta = CA_TTL,
        key_usage: bool = True,
    ) -> None:
        if trust_domain is None and common_name is None:
            raise ValueError("a test CA needs a trust domain or a common name")
        self.trust_domain = TrustDomain(trust_domain) if trust_domain else None
        self.parent = parent
        self.key = key or new_key(key_type)
        serial_number = x509.random_serial_number()
        if common_name is not None:
            subject = _name(common_name)
        else:
            kind = "intermediate" if parent else "root"
            subject = x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"Tessera test {trust_domain}"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, f"{kind}-{serial_number}"),
            ])
        self.certificate = _build(
            subject=subject,
            public_key=self.key.public_key(),
            issuer=parent,
            uris=[f"spiffe://{trust_domain}"] if trust_domain else [],
            ca=True,
            key_usage=key_usage,
            not_before=_default(not_before, _CA_BACKDATE),
            ttl=ttl,
            serial_number=serial_number,
            self_key=self.key,
        )

    @classmethod
    def named(
        cls,
        common_name: str,
        *,
        key: PrivateKey | None = None,
        key_type: KeyType | str = KeyType.EC_P256,
        not_before: datetime | None = None,
        ttl: timedelta = CA_TTL,
        key_usage: bool = True,
    ) -> TestCA:
        """A root CA of a PKI that is not SPIFFE's: subject ``CN=<common_name>``, no SAN."""
        return cls(None, common_name=common_name, key=key, key_type=key_type,
                   not_before=not_before, ttl=ttl, key_usage=key_usage)  # fmt: skip

    def intermediate(
        self,
        *,
        common_name: str | None = None,
        key: PrivateKey | None = None,
        key_type: KeyType | str = KeyType.EC_P256,
        not_before: datetime | None = None,
        ttl: timedelta = CA_TTL,
    ) -> TestCA:
        """A CA signed by this one; what it issues carries it (and any CA between) in its
        chain. Named like this CA (by trust domain) unless given ``common_name``."""
        if common_name is None and self.trust_domain is None:
            common_name = f"{self.certificate.subject.rfc4514_string()} intermediate"
        return TestCA(
            self.trust_domain.name if self.trust_domain else None,
            common_name=common_name, parent=self, key=key, key_type=key_type,
            not_before=not_before, ttl=ttl,
        )  # fmt: skip

    @property
    def root(self) -> TestCA:
        return self.parent.root if self.parent else self

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """The CA certificates a leaf issued here carries after itself (none for a root)."""
        if self.parent is None:
            return ()
        return (self.certificate, *self.parent.intermediates)

    def bundle(self) -> X509Bundle:
        """What relying parties of the trust domain hold: the root's certificate."""
        if self.trust_domain is None:
            raise ValueError(f"{self.certificate.subject.rfc4514_string()} has no trust domain")
        return X509Bundle(self.trust_domain, {self.root.certificate})

    def bundle_pem(self) -> bytes:
        return pem(self.root.certificate)

    def bundle_der(self) -> bytes:
        return der(self.root.certificate)

    def issue_x509_svid(
        self,
        spiffe_id: str | SpiffeId,
        *,
        ttl: timedelta = SVID_TTL,
        key_type: KeyType | str = KeyType.EC_P256,
        key: PrivateKey | None = None,
        not_before: datetime | None = None,
        dns_names: Sequence[str] = (),
    ) -> X509Svid:
        """An X509-SVID for ``spiffe_id`` (of any trust domain), valid from ``not_before``
        (default: ten seconds ago) for ``ttl``; its chain holds the intermediates."""
        issued = self.issue_certificate(
            uris=[str(spiffe_id)], dns_names=dns_names, key=key, key_type=key_type,
            extended_key_usage=_SVID_EXTENDED_KEY_USAGE, not_before=not_before, ttl=ttl,
        )  # fmt: skip
        return X509Svid(SpiffeId(str(spiffe_id)), issued.chain, issued.key)

    def sign_x509_svid(
        self,
        spiffe_id: str | SpiffeId,
        public_key: PublicKey,
        *,
        ttl: timedelta = SVID_TTL,
        not_before: datetime | None = None,
    ) -> x509.Certificate:
        """The X509-SVID leaf alone, for a key the test does not hold (a CSR's, as a server
        signs it)."""
        return _build(
            subject=x509.Name([]),
            public_key=public_key,
            issuer=self,
            uris=[str(spiffe_id)],
            extended_key_usage=_SVID_EXTENDED_KEY_USAGE,
            not_before=_default(not_before, _LEAF_BACKDATE),
            ttl=ttl,
        )

    def issue_certificate(
        self,
        *,
        subject: str | None = None,
        key: PrivateKey | None = None,
        key_type: KeyType | str = KeyType.EC_P256,
        uris: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        ca: bool = False,
        key_usage: bool = True,
        digital_signature: bool = True,
        extended_key_usage: Sequence[x509.ObjectIdentifier] = (),
        not_before: datetime | None = None,
        ttl: timedelta = SVID_TTL,
        serial_number: int | None = None,
    ) -> IssuedCertificate:
        """Any certificate, odd ones included: ``subject`` is a common name (none: an empty
        subject, and then the SAN is critical); the SAN holds ``uris``, ``dns_names`` and
        ``ip_addresses`` (none of them: no SAN at all); ``ca`` sets the CA flag;
        ``key_usage=False`` leaves keyUsage out, ``digital_signature=False`` leaves only that
        bit out of it."""
        key = key or new_key(key_type)
        certificate = _build(
            subject=_name(subject),
            public_key=key.public_key(),
            issuer=self,
            uris=uris,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            ca=ca,
            key_usage=key_usage,
            digital_signature=digital_signature,
            extended_key_usage=extended_key_usage,
            not_before=_default(not_before, _LEAF_BACKDATE),
            ttl=ttl,
            serial_number=serial_number,
        )
        return IssuedCertificate(certificate, key, self.intermediates)


def self_signed(
    *,
    subject: str | None = None,
    key: PrivateKey | None = None,
    key_type: KeyType | str = KeyType.EC_P256,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    ca: bool = False,
    not_before: datetime | None = None,
    ttl: timedelta = SVID_TTL,
) -> IssuedCertificate:
    """A certificate signed by its own key, with the options of ``TestCA.issue_certificate``
    (a self-signed leaf: what no CA vouches for)."""
    key = key or new_key(key_type)
    certificate = _build(
        subject=_name(subject),
        public_key=key.public_key(),
        issuer=None,
        uris=uris,
        dns_names=dns_names,
        ca=ca,
        not_before=_default(not_before, _LEAF_BACKDATE),
        ttl=ttl,
        self_key=key,
    )
    return IssuedCertificate(certificate, key)


def _name(common_name: str | None) -> x509.Name:
    if common_name is None:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _default(not_before: datetime | None, backdate: timedelta) -> datetime:
    return not_before if not_before is not None else datetime.now(UTC) - backdate


def _build(
    *,
    subject: x509.Name,
    public_key: PublicKey,
    issuer: TestCA | None,
    not_before: datetime,
    ttl: timedelta,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    ca: bool = False,
    key_usage: bool = True,
    digital_signature: bool = True,
    extended_key_usage: Sequence[x509.ObjectIdentifier] = (),
    serial_number: int | None = None,
    self_key: PrivateKey | None = None,
) -> x509.Certificate:
    """The one place tests build a certificate; self-signed with ``self_key`` when ``issuer``
    is None."""
    if issuer is not None:
        issuer_name, signing_key = issuer.certificate.subject, issuer.key
    else:
        assert self_key is not None, "a self-signed certificate needs its own key"
        issuer_name, signing_key = subject, self_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial_number or x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + ttl)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        issuer_key_id = issuer.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_key_id),
            critical=False,
        )
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature and not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if extended_key_usage:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False
        )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
    names += [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
    if names:
        # An empty subject leaves the SAN as the only name: RFC 5280 makes it critical then.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=not list(subject)
        )
    edwards = isinstance(signing_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    return builder.sign(signing_key, None if edwards else hashes.SHA256())


# -- writers ------------------------------------------------------------------------------


def pem(*certificates: x509.Certificate) -> bytes:
    """The certificates in PEM, one after the other."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def der(*certificates: x509.Certificate) -> bytes:
    """The certificates in DER, concatenated (the Workload API's form of a chain)."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certificates)


def key_pem(key: PrivateKey, *, password: bytes | None = None) -> bytes:
    """The key as PKCS#8 PEM, encrypted with ``password`` if given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption()
    )  # fmt: skip
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)  # fmt: skip


def key_der(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 DER (the Workload API's form)."""
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def write_pem(path: Path, *certificates: x509.Certificate) -> Path:
    path.write_bytes(pem(*certificates))
    return path


def write_key_pem(path: Path, key: PrivateKey) -> Path:
    """The key as PKCS#8 PEM in a file only its owner may read."""
    path.touch(mode=0o600)
    os.chmod(path, 0o600)
    path.write_bytes(key_pem(key))
    return path


def x509_svid_material(ca: TestCA, spiffe_id: str, *, hint: str = "") -> X509SvidMaterial:
    """A fresh X509-SVID from ``ca`` the way the Workload API sends it (DER chain, PKCS#8 key,
    the root's DER)."""
    svid = ca.issue_x509_svid(spiffe_id)
    return X509SvidMaterial(
        spiffe_id=spiffe_id,
        cert_chain_der=der(*svid.cert_chain),
        private_key_der=key_der(cast(PrivateKey, svid.private_key)),
        bundle_der=ca.bundle_der(),
        hint=hint,
    )
