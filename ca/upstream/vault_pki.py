"""The ``vault_pki`` upstream authority: a Vault/OpenBao PKI mount signs each X.509 authority.

The root (or the intermediate the mount issues from) never lives on a
Tessera server. For each new authority the server sends a CSR, signed by the
authority's key through its key manager (so a ``vault_transit`` key works
too), to ``<mount>/root/sign-intermediate``::

    upstream = load_upstream_authority(
        "vault_pki",
        {"address": "https://vault.example.org:8200", "token_file": "/run/tessera/token"},
        data_dir,
    )
    minted = upstream.mint_x509_ca(
        trust_domain=td, public_key=signer.public_key(), not_before=now, not_after=later,
        signer=signer,
    )

Configuration: the connection settings of :mod:`ca.vault` (address, token,
AppRole, ca_cert, timeout, ...) and

==============  ======================================================================
``mount``       where the PKI secrets engine is mounted; default ``pki``
``issuer_ref``  the issuer to sign with (name or id); default: the mount's default
                issuer
``ttl_cap``     longest lifetime of an authority (``12h``, ``7d``); default: the CA TTL
==============  ======================================================================

Each authority gets subject ``O=Tessera, OU=<trust domain>, CN=authority <key
identifier>``, the trust domain's SPIFFE ID as its only SAN, and an explicit notAfter:
the CA TTL, cut to ``ttl_cap`` and to the issuer's own notAfter. Vault makes
it a CA (``cA=true``, keyCertSign and cRLSign); the answer is checked for all
of that before it is used. The roots published in the bundle are the
self-signed certificates of the issuer's chain; the others are served with
each X509-SVID as intermediates.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from attestor.plugin import Plugin
from attestor.settings import Duration
from ca.errors import CAError
from ca.keymanager import Signer
from ca.upstream import MintedCA, UpstreamContext, is_self_signed
from ca.vault import VaultClient, VaultConnection, VaultRequestFailed, VaultSettings
from ca.x509ca import ORGANIZATION, build_csr_with_signer
from sdk.errors import ConfigError, FailedPrecondition, InvalidArgument
from sdk.keys import PublicKey
from sdk.peer import uri_sans
from sdk.spiffeid import TrustDomain

__all__ = ["PLUGIN", "VaultPkiSettings", "VaultPkiUpstreamAuthority"]

log = logging.getLogger(__name__)

NAME = "vault_pki"
WHAT = f"upstream authority {NAME!r}"
DEFAULT_MOUNT = "pki"
_MOUNT = re.compile(r"^[\w.-]+(?:/[\w.-]+)*$", re.ASCII)
_ISSUER_REF = re.compile(r"^[\w.-]{1,128}$", re.ASCII)
_MAX_NAME_ATTRIBUTE = 64


class VaultPkiSettings(VaultConnection):
    """``[upstream_authority.vault_pki]``: the connection settings and these."""

    mount: str = DEFAULT_MOUNT
    issuer_ref: str | None = None
    ttl_cap: Duration | None = None


class VaultPkiUpstreamAuthority:
    name = NAME

    def __init__(
        self,
        client: VaultClient,
        *,
        mount: str = DEFAULT_MOUNT,
        issuer_ref: str | None = None,
        ttl_cap: timedelta | None = None,
    ) -> None:
        self._client = client
        self._mount = mount
        self._issuer_ref = issuer_ref
        self._ttl_cap = ttl_cap

    @classmethod
    def from_settings(
        cls, settings: VaultPkiSettings, context: UpstreamContext
    ) -> VaultPkiUpstreamAuthority:
        mount = (settings.mount.strip() or DEFAULT_MOUNT).strip("/")
        if not _MOUNT.fullmatch(mount):
            raise ConfigError(f"{WHAT} mount {mount!r} is not a valid mount path")
        issuer_ref = (settings.issuer_ref or "").strip() or None
        if issuer_ref is not None and not _ISSUER_REF.fullmatch(issuer_ref):
            raise ConfigError(
                f"{WHAT} issuer_ref {issuer_ref!r} is not an issuer name or id"
            )
        connection = VaultSettings.from_connection(settings, plugin=WHAT)
        return cls(
            VaultClient(connection, plugin=WHAT),
            mount=mount,
            issuer_ref=issuer_ref,
            ttl_cap=settings.ttl_cap,
        )

    def mint_x509_ca(
        self,
        *,
        trust_domain: TrustDomain,
        public_key: PublicKey,
        not_before: datetime,
        not_after: datetime,
        signer: Signer | None = None,
    ) -> MintedCA:
        if signer is None:
            raise FailedPrecondition(
                f"{WHAT} needs the new authority's signer to sign a CSR, and none was given"
            )
        if signer.public_key() != public_key:
            raise InvalidArgument(
                f"signer key {signer.key_id!r} does not hold the private key of the new authority"
            )
        issuer_chain = self._issuer_chain()
        issuer = issuer_chain[0]
        issuer_expiry = issuer.not_valid_after_utc
        if issuer_expiry <= not_before:
            raise FailedPrecondition(
                f"the issuer of PKI mount {self._mount} at {self._client.address} expired at "
                f"{issuer_expiry.isoformat()}; renew it before the server can rotate"
            )
        not_after = min(not_after, issuer_expiry)
        if self._ttl_cap is not None:
            not_after = min(not_after, not_before + self._ttl_cap)
        roots = tuple(cert for cert in issuer_chain if is_self_signed(cert))
        if not roots:
            raise ConfigError(
                f"the chain of the issuer of PKI mount {self._mount} does not end in a "
                "self-signed root, so Tessera cannot tell which root to publish; import the "
                "issuer together with its chain up to the root"
            )
        chain = tuple(cert for cert in issuer_chain if cert not in roots)

        ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
        common_name = f"authority {ski.digest[:8].hex()}"
        csr = build_csr_with_signer(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), signer
        )
        answer = self._client.write(
            self._sign_path(),
            {
                "csr": csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                "common_name": common_name,
                "organization": ORGANIZATION,
                "ou": trust_domain.name[:_MAX_NAME_ATTRIBUTE],
                "uri_sans": f"spiffe://{trust_domain.name}",
                "exclude_cn_from_sans": True,
                "use_csr_values": False,
                "not_after": not_after.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "format": "pem",
            },
            policy_path=self._sign_path(),
        )
        certificate = self._check_minted(answer.get("certificate"), trust_domain, public_key)
        log.info(
            "upstream authority %r (%s/%s) signed X.509 authority serial %x for %s",
            NAME,
            self._client.address,
            self._mount,
            certificate.serial_number,
            trust_domain.name,
        )
        return MintedCA(certificate=certificate, chain=chain, upstream_roots=roots)

    # -- helpers ------------------------------------------------------------------------

    def _sign_path(self) -> str:
        if self._issuer_ref is None:
            return f"{self._mount}/root/sign-intermediate"
        return f"{self._mount}/issuer/{self._issuer_ref}/sign-intermediate"

    def _issuer_chain(self) -> list[x509.Certificate]:
        """The issuer's certificate, then the rest of its chain up to the root."""
        reference = self._issuer_ref or "default"
        path = f"{self._mount}/issuer/{reference}/json"
        try:
            data = self._client.read(path)
        except VaultRequestFailed as err:
            raise FailedPrecondition(
                f"PKI mount {self._mount} at {self._client.address} has no usable issuer "
                f"{reference!r} ({err.reason}); generate or import a root "
                f"first (e.g. `bao write {self._mount}/root/generate/internal "
                "common_name=\"Example Root\"`) or set issuer_ref"
            ) from None
        if data is None:
            raise FailedPrecondition(
                f"PKI mount {self._mount} at {self._client.address} has no issuer "
                f"{reference!r}; set issuer_ref to an existing issuer"
            )
        pems = [data.get("certificate"), *(data.get("ca_chain") or [])]
        certificates = _unique(_parse_pem(pem, path) for pem in pems if pem)
        if not certificates:
            raise FailedPrecondition(f"{path} at {self._client.address} holds no certificate")
        return certificates

    def _check_minted(
        self, pem: object, trust_domain: TrustDomain, public_key: PublicKey
    ) -> x509.Certificate:
        path = self._sign_path()
        if not isinstance(pem, str):
            raise CAError(f"{path} at {self._client.address} answered without a certificate")
        certificate = _parse_pem(pem, path)[0]
        problems = []
        if certificate.public_key() != public_key:
            problems.append("it holds another public key")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
            if not constraints.value.ca:
                problems.append("it is not a CA (basicConstraints cA=false)")
        except x509.ExtensionNotFound:
            problems.append("it has no basicConstraints")
        try:
            usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
            if not usage.key_cert_sign:
                problems.append("its keyUsage lacks keyCertSign")
        except x509.ExtensionNotFound:
            pass
        uris = uri_sans(certificate)
        if uris != [f"spiffe://{trust_domain.name}"]:
            problems.append(f"its URI SANs are {uris}, not only spiffe://{trust_domain.name}")
        if problems:
            raise CAError(
                f"PKI mount {self._mount} at {self._client.address} signed an authority "
                f"Tessera cannot use: {'; '.join(problems)}; check the mount's issuer settings"
            )
        return certificate


PLUGIN = Plugin(NAME, VaultPkiSettings, VaultPkiUpstreamAuthority.from_settings)


def _parse_pem(pem: str, path: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem.encode("ascii"))
    except ValueError:
        raise CAError(f"{path} answered with a certificate that cannot be parsed") from None


def _unique(groups: Iterable[list[x509.Certificate]]) -> list[x509.Certificate]:
    seen: list[x509.Certificate] = []
    for group in groups:
        for certificate in group:
            if certificate not in seen:
                seen.append(certificate)
    return seen
