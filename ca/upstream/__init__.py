"""Upstream authorities: who signs the server's X.509 authority, when it is not self-signed.

An upstream authority is a plugin. Given the public key of the server's next
X.509 authority, it returns that authority's certificate (an intermediate),
any certificates between it and the roots, and the roots to publish::

    upstream = load_upstream_authority(
        "disk", {"cert_file_path": "root.pem", "key_file_path": "root.key"}, data_dir
    )
    minted = upstream.mint_x509_ca(
        trust_domain=td, public_key=signer.public_key(), not_before=now, not_after=later
    )
    bundle_roots = minted.upstream_roots

Built-ins: ``disk`` (a CA certificate and key in PEM files), ``vault_pki`` (a
Vault/OpenBao PKI mount) and ``shared_root`` (a self-signed root kept, its key
encrypted, in the datastore every server shares). :data:`UPSTREAM_AUTHORITIES`
is their registry (see :mod:`attestor.plugin`); its context is an
:class:`UpstreamContext`. A new upstream authority is a module exporting
``PLUGIN``, listed there. With no upstream authority each server signs its
authorities itself (each is a self-signed root).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from attestor.plugin import PluginConfig, Registry
from ca.keymanager import Signer
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.keys import PublicKey
from sdk.spiffeid import TrustDomain

if TYPE_CHECKING:
    from ca.datastore.interface import Datastore

__all__ = [
    "UPSTREAM_AUTHORITIES",
    "MintedCA",
    "UpstreamAuthority",
    "UpstreamContext",
    "is_self_signed",
    "load_upstream_authority",
]


@dataclass(frozen=True)
class UpstreamContext:
    """What the server lends an upstream authority besides its configuration."""

    datastore: Datastore | None = None
    clock: Clock = SYSTEM_CLOCK
    ca_ttl: timedelta | None = None  # how long the authorities it signs are meant to live


@dataclass(frozen=True)
class MintedCA:
    certificate: x509.Certificate  # the server's new X.509 authority (an intermediate)
    chain: tuple[x509.Certificate, ...]  # intermediates between it and the roots (may be empty)
    upstream_roots: tuple[x509.Certificate, ...]  # trust anchors to publish in the bundle


class UpstreamAuthority(Protocol):
    name: str

    def mint_x509_ca(
        self,
        *,
        trust_domain: TrustDomain,
        public_key: PublicKey,
        not_before: datetime,
        not_after: datetime,
        signer: Signer | None = None,
    ) -> MintedCA:
        """Sign an X.509 authority for ``public_key``; notAfter may come out earlier.

        ``signer`` holds ``public_key``'s private key, for upstreams that need
        proof of possession (a CSR, as Vault/OpenBao PKI does); others ignore it.
        """
        ...


UPSTREAM_AUTHORITIES: Registry[UpstreamContext, UpstreamAuthority] = Registry(
    "upstream authority",
    "upstream_authority",
    {
        "disk": "ca.upstream.disk",
        "shared_root": "ca.upstream.shared_root",
        "vault_pki": "ca.upstream.vault_pki",
    },
    plural="upstream authorities",
)
"""The built-in upstream authorities; the context is what the server lends them."""


def load_upstream_authority(
    name: str,
    config: Mapping[str, Any],
    data_dir: Path,
    context: UpstreamContext | None = None,
) -> UpstreamAuthority:
    """The upstream authority called ``name``, configured from ``config``; ConfigError if
    unknown. ``data_dir`` is kept for callers; no built-in needs it."""
    return UPSTREAM_AUTHORITIES.load(PluginConfig(name, config), context or UpstreamContext())


def is_self_signed(certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` names itself as issuer and its own key signed it (a root)."""
    if certificate.subject != certificate.issuer:
        return False
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
