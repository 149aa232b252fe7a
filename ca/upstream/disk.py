"""The ``disk`` upstream authority: an existing CA's certificate and key in PEM files.

The server's X.509 authorities become intermediates of that CA, and the
CA's roots are what agents and workloads trust::

    upstream = load_upstream_authority(
        "disk",
        {"cert_file_path": "/etc/tessera/upstream.crt",
         "key_file_path": "/etc/tessera/upstream.key"},
        data_dir,
    )

Configuration:

====================  ==========================================================
``cert_file_path``    PEM: the upstream CA certificate, then any intermediates
                      between it and the root (required)
``key_file_path``     PEM: the upstream CA's private key, unencrypted (required)
``bundle_file_path``  PEM: the root certificates to publish; default: the upstream
                      certificate itself, which must then be self-signed
====================  ==========================================================

The files are read again for every authority minted, so replacing them
takes effect at the next rotation. A minted authority never outlives the
upstream certificate. The key file must be readable by the server alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestor.plugin import Plugin
from attestor.settings import FilePath, Settings
from ca.keymanager import LocalSigner, Signer
from ca.upstream import MintedCA, UpstreamContext, is_self_signed
from ca.x509ca import build_ca_certificate
from sdk.errors import ConfigError, FailedPrecondition, InvalidArgument
from sdk.keys import PublicKey
from sdk.spiffeid import TrustDomain

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class _Material:
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    signer: LocalSigner


class DiskSettings(Settings):
    """``[upstream_authority.disk]``."""

    cert_file_path: FilePath
    key_file_path: FilePath
    bundle_file_path: FilePath | None = None


class DiskUpstreamAuthority:
    name = "disk"

    def __init__(
        self, cert_file_path: Path, key_file_path: Path, bundle_file_path: Path | None = None
    ) -> None:
        self._cert_file_path = cert_file_path
        self._key_file_path = key_file_path
        self._bundle_file_path = bundle_file_path
        self._load()  # fail at start-up, not at the first rotation

    @classmethod
    def from_settings(
        cls, settings: DiskSettings, context: UpstreamContext
    ) -> DiskUpstreamAuthority:
        bundle = settings.bundle_file_path
        return cls(
            settings.cert_file_path.expanduser(),
            settings.key_file_path.expanduser(),
            bundle.expanduser() if bundle else None,
        )

    def mint_x509_ca(
        self,
        *,
        trust_domain: TrustDomain,
        public_key: PublicKey,
        not_before: datetime,
        not_after: datetime,
        signer: Signer | None = None,  # not needed: the upstream key signs directly
    ) -> MintedCA:
        material = self._load()
        upstream_expiry = material.certificate.not_valid_after_utc
        if upstream_expiry <= not_before:
            raise FailedPrecondition(
                f"the upstream certificate in {self._cert_file_path} expired at "
                f"{upstream_expiry.isoformat()}; renew it before the server can rotate"
            )
        certificate = build_ca_certificate(
            trust_domain=trust_domain,
            public_key=public_key,
            signer=material.signer,
            issuer=material.certificate,
            not_before=not_before,
            not_after=min(not_after, upstream_expiry),
        )
        log.info(
            "upstream authority 'disk' signed X.509 authority serial %x for %s",
            certificate.serial_number,
            trust_domain.name,
        )
        return MintedCA(
            certificate=certificate, chain=material.chain, upstream_roots=material.roots
        )

    def _load(self) -> _Material:
        certificates = _read_certificates(self._cert_file_path, "cert_file_path")
        certificate = certificates[0]
        _require_ca(certificate, self._cert_file_path)
        private_key = _read_private_key(self._key_file_path)
        if private_key.public_key() != certificate.public_key():
            raise ConfigError(
                f"the private key in {self._key_file_path} does not match the certificate in "
                f"{self._cert_file_path}; point key_file_path at that certificate's key"
            )
        try:
            signer = LocalSigner("upstream", private_key)
        except InvalidArgument as err:
            raise ConfigError(f"the key in {self._key_file_path}: {err.message}") from None
        if self._bundle_file_path is not None:
            roots = tuple(_read_certificates(self._bundle_file_path, "bundle_file_path"))
        elif is_self_signed(certificate):
            roots = (certificate,)
        else:
            raise ConfigError(
                f"the certificate in {self._cert_file_path} is not self-signed, so Tessera "
                "cannot tell which roots to trust; set bundle_file_path to a PEM file of "
                "the root certificates"
            )
        chain = tuple(cert for cert in certificates if cert not in roots)
        return _Material(certificate, chain, roots, signer)


PLUGIN = Plugin("disk", DiskSettings, DiskUpstreamAuthority.from_settings)


def _read_bytes(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"cannot read {path} ({err.strerror}); check the {setting} setting of upstream "
            "authority 'disk' and the file's permissions"
        ) from None


def _read_certificates(path: Path, setting: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(_read_bytes(path, setting))
    except ValueError:
        raise ConfigError(
            f"{path} ({setting}) holds no PEM certificate; expected "
            "'-----BEGIN CERTIFICATE-----' blocks"
        ) from None
    return certificates


def _read_private_key(path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    data = _read_bytes(path, "key_file_path")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"the private key in {path} is encrypted; upstream authority 'disk' needs it "
            "unencrypted (protect the file with 0600 permissions instead)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{path} (key_file_path) holds no PEM private key; expected a "
            "'-----BEGIN PRIVATE KEY-----' (or EC/RSA PRIVATE KEY) block"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"the private key in {path} is not an EC or RSA key")
    return key


def _require_ca(certificate: x509.Certificate, path: Path) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        may_sign = usage.key_cert_sign
    except x509.ExtensionNotFound:
        may_sign = True
    if not is_ca or not may_sign:
        raise ConfigError(
            f"the certificate in {path} is not a CA certificate (it needs basicConstraints "
            "cA=true and, if it has keyUsage, keyCertSign); point cert_file_path at a CA"
        )
