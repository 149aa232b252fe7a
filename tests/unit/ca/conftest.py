"""Fixtures for the server's cryptographic core: a fake remote signer, a root the server's
own code makes, and the outside judges (the openssl binary and pkilint) that certificates must
satisfy. Keys come from the suite's pool (``key_pool``, ``tests/support/pki.py``)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkilint import loader
from pkilint.pkix import certificate as pkix_certificate
from pkilint.pkix import extension, name
from pkilint.validation import ValidationFindingSeverity
from spiffe import TrustDomain

from ca.keymanager import LocalSigner
from ca.x509ca import build_ca_certificate
from sdk.clock import ManualClock
from sdk.keys import KeyType, PrivateKey, PublicKey
from tests.support.pki import KEYS

TRUST_DOMAIN = TrustDomain("example.org")
START = datetime(2030, 1, 1, tzinfo=UTC)


def pooled_key(key_type: KeyType, slot: int = 0) -> PrivateKey:
    """One key per (type, slot) for the whole run (the ``key_pool`` fixture's pool)."""
    return KEYS(key_type, slot)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


class RemoteSigner:
    """A Signer whose key is out of reach, as with a Vault transit key: only sign()."""

    def __init__(self, key_id: str, private_key: PrivateKey) -> None:
        self._local = LocalSigner(key_id, private_key)
        self.signed = 0

    @property
    def key_id(self) -> str:
        return self._local.key_id

    @property
    def key_type(self) -> KeyType:
        return self._local.key_type

    def public_key(self) -> PublicKey:
        return self._local.public_key()

    def sign(self, data: bytes) -> bytes:
        self.signed += 1
        return self._local.sign(data)

    def local_private_key(self) -> PrivateKey | None:
        return None


@pytest.fixture
def remote_signer() -> type[RemoteSigner]:
    return RemoteSigner


@pytest.fixture
def make_root() -> Callable[..., tuple[x509.Certificate, LocalSigner]]:
    """A self-signed authority for example.org valid for a day from START."""

    def make(
        key_type: KeyType = KeyType.EC_P256, slot: int = 0, lifetime: timedelta = timedelta(days=1)
    ) -> tuple[x509.Certificate, LocalSigner]:
        signer = LocalSigner(f"root-{key_type}-{slot}", pooled_key(key_type, slot))
        certificate = build_ca_certificate(
            trust_domain=TRUST_DOMAIN,
            public_key=signer.public_key(),
            signer=signer,
            issuer=None,
            not_before=START,
            not_after=START + lifetime,
        )
        return certificate, signer

    return make


def _pem(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


@pytest.fixture
def openssl_verify(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``openssl verify`` on ``leaf`` against ``roots`` (+ ``untrusted`` intermediates),
    at ``at`` (default: one minute after START)."""

    def verify(
        roots: Sequence[x509.Certificate],
        leaf: x509.Certificate,
        untrusted: Sequence[x509.Certificate] = (),
        at: datetime = START + timedelta(minutes=1),
    ) -> subprocess.CompletedProcess[str]:
        (tmp_path / "ca.pem").write_bytes(_pem(roots))
        (tmp_path / "leaf.pem").write_bytes(_pem([leaf]))
        command = ["openssl", "verify", "-attime", str(int(at.timestamp()))]
        command += ["-CAfile", str(tmp_path / "ca.pem")]
        if untrusted:
            (tmp_path / "untrusted.pem").write_bytes(_pem(untrusted))
            command += ["-untrusted", str(tmp_path / "untrusted.pem")]
        command.append(str(tmp_path / "leaf.pem"))
        return subprocess.run(command, capture_output=True, text=True, check=False)

    return verify


_PKILINT = pkix_certificate.create_pkix_certificate_validator_container(
    pkix_certificate.create_decoding_validators(
        name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
    ),
    [
        pkix_certificate.create_issuer_validator_container([]),
        pkix_certificate.create_validity_validator_container(),
        pkix_certificate.create_subject_validator_container([]),
        pkix_certificate.create_extensions_validator_container([]),
        pkix_certificate.create_spki_validator_container([]),
    ],
)


def pkilint_problems(certificate: x509.Certificate) -> list[str]:
    """pkilint's RFC 5280 ERROR and FATAL findings, less the one on ``spiffe://`` URI syntax."""
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(
        certificate.public_bytes(serialization.Encoding.DER), "certificate"
    )
    problems = []
    for result in _PKILINT.validate(document.root):
        for description in result.finding_descriptions:
            finding = description.finding
            if finding.severity > ValidationFindingSeverity.ERROR:
                continue
            if finding.code == "pkix.invalid_uri_syntax" and "spiffe://" in (
                description.message or ""
            ):
                continue
            problems.append(f"{finding.severity.name} {finding.code}: {description.message}")
    return problems


@pytest.fixture
def pkilint() -> Callable[[x509.Certificate], list[str]]:
    return pkilint_problems
