"""The ``shared_root`` upstream authority: one self-signed root for the whole trust domain,
kept in the datastore every server shares, its key encrypted under a KEK they share.

Each server still signs SVIDs with an X.509 authority of its own, but that
authority is an intermediate under the shared root, so the trust bundle holds
the root (one anchor, or two across a root rotation) instead of one
self-signed anchor per server::

    [upstream_authority.shared_root]
    kek_file = "/etc/tessera/kek"      # the same secret on every server (or TESSERA_KEK)
    root_ttl = "365d"

The first server that needs the root makes it; the others find it. When less
than half of the newest root's own life is left, the next server to mint an
authority makes the next root (a generation number keeps two servers from both
doing it) and signs new authorities under it; a new authority is *prepared*
(published in the bundle, with its root) before it signs anything, so every
SVID keeps validating across the switch.

Configuration:

============  =====================================================================
``kek_file``  file holding the key-encryption key every server shares; default:
              the ``TESSERA_KEK`` environment variable (one of them is required)
``root_ttl``  lifetime of each root (default ``365d``); at least twice the CA TTL,
              ten times or more is sensible
``key_type``  ``ec-p256`` (default), ``ec-p384``, ``rsa-2048``, ``rsa-4096``
============  =====================================================================
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestor.plugin import Plugin
from attestor.settings import Duration, FilePath, Settings
from ca.datastore.interface import Datastore
from ca.datastore.records import SharedRoot
from ca.keymanager import LocalSigner, Signer
from ca.keymanager.disk import KEK_ENVIRONMENT_VARIABLE, Kek, configured_kek
from ca.upstream import MintedCA, UpstreamContext
from ca.x509ca import build_ca_certificate
from sdk.clock import Clock
from sdk.durations import format_duration
from sdk.errors import AlreadyExists, ConfigError, FailedPrecondition, InvalidArgument
from sdk.keys import KeyType, PublicKey, generate_private_key, parse_key_type
from sdk.spiffeid import TrustDomain

log = logging.getLogger(__name__)

WHAT = "upstream authority 'shared_root'"
DEFAULT_ROOT_TTL = timedelta(days=365)
ROOT_BACKDATE = timedelta(seconds=10)


class SharedRootSettings(Settings):
    """``[upstream_authority.shared_root]``."""

    kek_file: FilePath | None = None
    root_ttl: Duration = DEFAULT_ROOT_TTL
    key_type: str = KeyType.EC_P256.value


class SharedRootUpstreamAuthority:
    name = "shared_root"

    def __init__(
        self,
        store: Datastore,
        kek: Kek,
        *,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        key_type: KeyType = KeyType.EC_P256,
        clock: Clock,
    ) -> None:
        self._store = store
        self._kek = kek
        self._root_ttl = root_ttl
        self._key_type = key_type
        self._clock = clock
        self._lock = threading.Lock()
        self._signers: dict[bytes, LocalSigner] = {}  # root certificate DER -> its key

    @classmethod
    def from_settings(
        cls, settings: SharedRootSettings, context: UpstreamContext
    ) -> SharedRootUpstreamAuthority:
        if context.datastore is None:
            raise ConfigError(f"{WHAT} needs the server's datastore")
        kek = configured_kek(settings.kek_file.expanduser() if settings.kek_file else None)
        if kek is None:
            raise ConfigError(
                f"{WHAT} needs the key-encryption key every server of the trust domain "
                f"shares: set kek_file, or the {KEK_ENVIRONMENT_VARIABLE} environment "
                "variable, to the same secret on every server (e.g. the output of "
                "`openssl rand -hex 32`)"
            )
        root_ttl = settings.root_ttl
        try:
            key_type = parse_key_type(settings.key_type)
        except InvalidArgument as err:
            raise ConfigError(f"{WHAT}: {err.message}") from err
        if context.ca_ttl is not None and root_ttl < 2 * context.ca_ttl:
            raise ConfigError(
                f"{WHAT} setting root_ttl ({format_duration(root_ttl)}) must be at least "
                f"twice the CA TTL ({format_duration(context.ca_ttl)}), or every authority is "
                "cut short by its root; ten times or more is sensible"
            )
        if root_ttl < timedelta(minutes=1):
            raise ConfigError(f"{WHAT} setting root_ttl must be at least 1m")
        return cls(context.datastore, kek, root_ttl=root_ttl, key_type=key_type,
                   clock=context.clock)  # fmt: skip

    def mint_x509_ca(
        self,
        *,
        trust_domain: TrustDomain,
        public_key: PublicKey,
        not_before: datetime,
        not_after: datetime,
        signer: Signer | None = None,
    ) -> MintedCA:
        root = self._current_root(trust_domain)
        certificate = x509.load_der_x509_certificate(root.certificate)
        authority = build_ca_certificate(
            trust_domain=trust_domain,
            public_key=public_key,
            signer=self._root_signer(root),
            issuer=certificate,
            not_before=not_before,
            not_after=not_after,  # capped at the root's notAfter
        )
        return MintedCA(certificate=authority, chain=(), upstream_roots=(certificate,))

    def _current_root(self, trust_domain: TrustDomain) -> SharedRoot:
        """The newest root; a new one first when less than half of its life is left."""
        with self._lock:
            for _ in range(3):  # another server may make the next root at the same moment
                roots = self._store.list_shared_roots()
                newest = roots[-1] if roots else None
                now = self._clock.now()
                if newest is not None and newest.not_after - now > _half_life(newest):
                    return newest
                generation = newest.generation + 1 if newest is not None else 1
                try:
                    made = self._store.add_shared_root(self._new_root(trust_domain, generation))
                except AlreadyExists:
                    continue
                log.info("made shared root generation %d for %s", generation, trust_domain.name)
                return made
            raise FailedPrecondition(
                "could not agree on the shared root with the other servers; try again"
            )

    def _new_root(self, trust_domain: TrustDomain, generation: int) -> SharedRoot:
        now = self._clock.now()
        key = generate_private_key(self._key_type)
        signer = LocalSigner(f"shared-root-{generation}", key)
        certificate = build_ca_certificate(
            trust_domain=trust_domain,
            public_key=key.public_key(),
            signer=signer,
            issuer=None,
            not_before=now - ROOT_BACKDATE,
            not_after=now + self._root_ttl,
        )
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._kek.secret),
        )
        return SharedRoot(
            generation=generation,
            certificate=certificate.public_bytes(serialization.Encoding.DER),
            encrypted_key=encrypted,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            created_at=now,
        )

    def _root_signer(self, root: SharedRoot) -> LocalSigner:
        signer = self._signers.get(root.certificate)
        if signer is None:
            try:
                key = serialization.load_pem_private_key(root.encrypted_key, self._kek.secret)
            except (ValueError, TypeError):
                raise ConfigError(
                    f"the shared root's key (generation {root.generation}) cannot be decrypted "
                    f"with the key-encryption key from {self._kek.source}; every server of the "
                    "trust domain needs the same kek_file or "
                    f"{KEK_ENVIRONMENT_VARIABLE}"
                ) from None
            signer = self._signers[root.certificate] = LocalSigner(
                f"shared-root-{root.generation}", key  # type: ignore[arg-type]
            )
        return signer


def _half_life(root: SharedRoot) -> timedelta:
    return (root.not_after - root.not_before) / 2


PLUGIN = Plugin("shared_root", SharedRootSettings, SharedRootUpstreamAuthority.from_settings)
