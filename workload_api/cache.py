"""The agent's cache: authorized entries, their SVIDs, the bundles, and when to rotate.

Everything the Workload API serves is read from here, from memory. The
agent's sync loop fills it; every change that could alter an answer bumps
:meth:`SvidCache.version`, which wakes the Workload API streams::

    cache = SvidCache(trust_domain, clock=clock, rng=random.Random(7))
    cache.apply_entries([AuthorizedEntry.from_json(e) for e in update.entries],
                        update.entry_ids)
    cache.set_bundles(own_bundle, {"partner.test": partner_bundle})
    for entry in cache.entries_needing_svids():       # new, changed, or due for rotation
        cache.store_x509_svid(entry, chain_der, key_der, expires_at)
    cache.next_rotation()                             # when to look again
    cache.x509_context(selectors)                     # what one workload sees

Rotation: an X509-SVID is renewed at half of the life it had when the agent
received it, jittered by ±10% of that half (so between 45% and 55% of its
life), so that agents started together do not renew together. (The life is
counted from receipt, not from notBefore: the server back-dates notBefore a
few seconds, which would make short-lived SVIDs look half-spent on arrival.)
JWT-SVIDs are cached per (SPIFFE ID, audience set) and renewed once half their
life has passed; a cached one stays usable until it expires, for when no
server can be reached.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from cryptography import x509

from attestor.selector import Selector, matches
from sdk.bundle import TrustBundle
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.errors import InvalidArgument
from sdk.spiffeid import TrustDomain, parse_trust_domain
from workload_api.identity import X509Context, X509SvidMaterial

__all__ = [
    "JITTER",
    "ROTATION_POINT",
    "AuthorizedEntry",
    "CachedJwtSvid",
    "CachedX509Svid",
    "JwtSvidCache",
    "SvidCache",
    "rotation_time",
]

ROTATION_POINT: Final = 0.5
"""Renew when this fraction of an SVID's life has passed."""
JITTER: Final = 0.1
"""± this fraction of the rotation point."""
MIN_ROTATION_DELAY: Final = timedelta(seconds=1)
"""Never plan a renewal sooner than this after receipt, even for an SVID born expired."""
MAX_JWT_SVIDS: Final = 4096


@dataclass(frozen=True)
class AuthorizedEntry:
    """A registration entry the server authorized for this agent, as the agent keeps it."""

    id: str
    spiffe_id: str
    parent_id: str
    selectors: frozenset[Selector]
    dns_names: tuple[str, ...] = ()
    federates_with: tuple[str, ...] = ()
    """Trust domain names, e.g. ``partner.test``."""
    hint: str = ""
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    expires_at: int | None = None
    revision: int = 0
    created_at: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuthorizedEntry:
        """Parse an entry of ``GET /v1/agent/entries``; InvalidArgument if malformed."""
        try:
            selectors = frozenset(
                Selector(str(s["type"]), str(s["value"])) for s in data["selectors"]
            )
            expires_at = data.get("expires_at")
            return cls(
                id=str(data["id"]),
                spiffe_id=str(data["spiffe_id"]),
                parent_id=str(data["parent_id"]),
                selectors=selectors,
                dns_names=tuple(str(d) for d in data.get("dns_names") or ()),
                federates_with=tuple(
                    parse_trust_domain(str(td)).name for td in data.get("federates_with") or ()
                ),
                hint=str(data.get("hint") or ""),
                x509_svid_ttl=int(data.get("x509_svid_ttl") or 0),
                jwt_svid_ttl=int(data.get("jwt_svid_ttl") or 0),
                expires_at=int(expires_at) if expires_at is not None else None,
                revision=int(data.get("revision_number") or 0),
                created_at=int(data.get("created_at") or 0),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgument(f"the server sent a malformed entry: {err!r}") from err

    @property
    def svid_shape(self) -> tuple[object, ...]:
        """What the entry's X509-SVID depends on; a change means a new SVID."""
        return (self.spiffe_id, self.dns_names, self.x509_svid_ttl)

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now.timestamp()


@dataclass(frozen=True)
class CachedX509Svid:
    entry_id: str
    spiffe_id: str
    shape: tuple[object, ...]
    cert_chain_der: bytes
    private_key_der: bytes
    received_at: datetime
    expires_at: datetime
    renew_at: datetime
    authority_id: str = ""
    """The signing authority: the hex key identifier the leaf names (its AKI)."""


@dataclass(frozen=True)
class CachedJwtSvid:
    spiffe_id: str
    audience: frozenset[str]
    token: str
    received_at: datetime
    expires_at: datetime

    @property
    def renew_at(self) -> datetime:
        return self.received_at + (self.expires_at - self.received_at) * ROTATION_POINT


def rotation_time(received_at: datetime, expires_at: datetime, rng: random.Random) -> datetime:
    """When to renew an SVID received at ``received_at``: half its life, ±10% of that."""
    life = expires_at - received_at
    fraction = ROTATION_POINT * (1 + rng.uniform(-JITTER, JITTER))
    return received_at + max(life * fraction, MIN_ROTATION_DELAY)


class JwtSvidCache:
    """JWT-SVIDs by (SPIFFE ID, audience set), least recently used dropped first."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, max_entries: int = MAX_JWT_SVIDS) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._svids: OrderedDict[tuple[str, frozenset[str]], CachedJwtSvid] = OrderedDict()

    def __len__(self) -> int:
        return len(self._svids)

    def fresh(self, spiffe_id: str, audience: Iterable[str]) -> CachedJwtSvid | None:
        """The cached token if less than half its life has passed."""
        svid = self._get(spiffe_id, audience)
        return svid if svid is not None and self._clock.now() < svid.renew_at else None

    def usable(self, spiffe_id: str, audience: Iterable[str]) -> CachedJwtSvid | None:
        """The cached token if it has not expired (for when no server answers)."""
        svid = self._get(spiffe_id, audience)
        return svid if svid is not None and self._clock.now() < svid.expires_at else None

    def store(
        self, spiffe_id: str, audience: Iterable[str], token: str, expires_at: datetime
    ) -> CachedJwtSvid:
        key = (spiffe_id, frozenset(audience))
        svid = CachedJwtSvid(spiffe_id, key[1], token, self._clock.now(), expires_at)
        self._svids[key] = svid
        self._svids.move_to_end(key)
        self._prune()
        return svid

    def forget_except(self, spiffe_ids: Collection[str]) -> None:
        """Drop the tokens of identities the agent no longer holds."""
        for key in [k for k in self._svids if k[0] not in spiffe_ids]:
            del self._svids[key]

    def forget_signed_by(self, authority_ids: Collection[str]) -> int:
        """Drop tokens whose signing key (``kid``) is tainted; returns how many."""
        doomed = [k for k, svid in self._svids.items() if jwt_key_id(svid.token) in authority_ids]
        for key in doomed:
            del self._svids[key]
        return len(doomed)

    def _get(self, spiffe_id: str, audience: Iterable[str]) -> CachedJwtSvid | None:
        key = (spiffe_id, frozenset(audience))
        svid = self._svids.get(key)
        if svid is not None:
            self._svids.move_to_end(key)
        return svid

    def _prune(self) -> None:
        now = self._clock.now()
        for key in [k for k, svid in self._svids.items() if svid.expires_at <= now]:
            del self._svids[key]
        while len(self._svids) > self._max_entries:
            self._svids.popitem(last=False)


class SvidCache:
    """Entries, X509-SVIDs and bundles, with the version that wakes Workload API streams."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self._clock = clock
        self._rng = rng or random.Random()
        self._entries: dict[str, AuthorizedEntry] = {}
        self._svids: dict[str, CachedX509Svid] = {}
        self._bundle: TrustBundle | None = None
        self._federated: dict[str, TrustBundle] = {}
        self._tainted: frozenset[str] = frozenset()
        self._version = 0
        self._changed = asyncio.Event()

    # -- what the sync loop feeds in ----------------------------------------------------

    @property
    def entries(self) -> Mapping[str, AuthorizedEntry]:
        return self._entries

    @property
    def bundle(self) -> TrustBundle | None:
        return self._bundle

    @property
    def federated_bundles(self) -> Mapping[str, TrustBundle]:
        return self._federated

    @property
    def x509_svid_count(self) -> int:
        return len(self._svids)

    def apply_entries(
        self, changed: Iterable[AuthorizedEntry], authorized_ids: Collection[str]
    ) -> bool:
        """Add or replace ``changed``; drop entries (and SVIDs) not in ``authorized_ids``."""
        modified = False
        for entry in changed:
            if entry.id in authorized_ids and self._entries.get(entry.id) != entry:
                self._entries[entry.id] = entry
                modified = True
        for entry_id in [i for i in self._entries if i not in authorized_ids]:
            del self._entries[entry_id]
            self._svids.pop(entry_id, None)
            modified = True
        if modified:
            self._bump()
        return modified

    def forget_entries(self) -> None:
        """Drop every entry and X509-SVID (the bundles stay): workloads get no identity."""
        if self._entries or self._svids:
            self._entries.clear()
            self._svids.clear()
            self._bump()

    def set_bundles(self, bundle: TrustBundle, federated: Mapping[str, TrustBundle]) -> bool:
        """Replace the bundles; True (and a new version) when anything changed."""
        federated = {parse_trust_domain(td).name: b for td, b in federated.items()}
        federated.pop(self.trust_domain.name, None)
        if bundle == self._bundle and federated == self._federated:
            return False
        self._bundle = bundle
        self._federated = federated
        self._bump()
        return True

    def set_tainted(self, authority_ids: Collection[str]) -> int:
        """Remember the tainted authorities; returns how many cached SVIDs they signed."""
        self._tainted = frozenset(authority_ids)
        return sum(1 for svid in self._svids.values() if svid.authority_id in self._tainted)

    def entries_needing_svids(self) -> list[AuthorizedEntry]:
        """Entries without an SVID, whose SVID no longer fits them, is due for rotation,
        or was signed by a tainted authority."""
        now = self._clock.now()
        due = []
        for entry in self._ordered(self._entries.values()):
            if entry.expired(now):
                continue
            svid = self._svids.get(entry.id)
            if (
                svid is None
                or svid.shape != entry.svid_shape
                or now >= svid.renew_at
                or svid.authority_id in self._tainted
            ):
                due.append(entry)
        return due

    def store_x509_svid(
        self,
        entry: AuthorizedEntry,
        cert_chain_der: Sequence[bytes],
        private_key_der: bytes,
        expires_at: datetime,
    ) -> CachedX509Svid | None:
        """Keep a new SVID for ``entry``; the one it replaces, if any."""
        if entry.id not in self._entries:
            return None  # the entry went away while its CSR was out
        now = self._clock.now()
        svid = CachedX509Svid(
            entry_id=entry.id,
            spiffe_id=entry.spiffe_id,
            shape=entry.svid_shape,
            cert_chain_der=b"".join(cert_chain_der),
            private_key_der=private_key_der,
            received_at=now,
            expires_at=expires_at,
            renew_at=rotation_time(now, expires_at, self._rng),
            authority_id=leaf_authority_id(cert_chain_der[0]) if cert_chain_der else "",
        )
        previous = self._svids.get(entry.id)
        self._svids[entry.id] = svid
        self._bump()
        return previous

    def svid_for(self, entry_id: str) -> CachedX509Svid | None:
        return self._svids.get(entry_id)

    def next_rotation(self) -> datetime | None:
        """The earliest planned renewal, if any SVID is cached."""
        return min((s.renew_at for s in self._svids.values()), default=None)

    # -- what workloads see -------------------------------------------------------------

    def matching_entries(self, selectors: Collection[Selector]) -> list[AuthorizedEntry]:
        """Entries whose every selector is among the workload's, oldest first."""
        now = self._clock.now()
        return [
            entry
            for entry in self._ordered(self._entries.values())
            if not entry.expired(now) and matches(entry.selectors, selectors)
        ]

    def x509_context(self, selectors: Collection[Selector]) -> X509Context:
        """The SVIDs of the matching entries, and the bundles of the domains they federate with."""
        now = self._clock.now()
        bundle_der = self._bundle.x509_der() if self._bundle is not None else b""
        svids: list[X509SvidMaterial] = []
        federates_with: set[str] = set()
        for entry in self.matching_entries(selectors):
            svid = self._svids.get(entry.id)
            if svid is None or svid.expires_at <= now:
                continue
            svids.append(
                X509SvidMaterial(
                    spiffe_id=svid.spiffe_id,
                    cert_chain_der=svid.cert_chain_der,
                    private_key_der=svid.private_key_der,
                    bundle_der=bundle_der,
                    hint=entry.hint,
                )
            )
            federates_with.update(entry.federates_with)
        federated = {
            f"spiffe://{td}": self._federated[td].x509_der()
            for td in sorted(federates_with)
            if td in self._federated
        }
        return X509Context(svids=tuple(svids), federated_bundles=federated)

    def x509_bundles(self, selectors: Collection[Selector]) -> dict[str, bytes]:
        """X.509 bundles keyed ``spiffe://<trust-domain>``: the own one and those of the
        domains the entries matching ``selectors`` federate with."""
        return {
            f"spiffe://{b.trust_domain.name}": b.x509_der() for b in self._visible(selectors)
        }

    def jwt_bundles(self, selectors: Collection[Selector]) -> dict[str, bytes]:
        """JWT bundles (JWKS), chosen as for :meth:`x509_bundles`."""
        return {
            f"spiffe://{b.trust_domain.name}": b.jwks_json() for b in self._visible(selectors)
        }

    def bundle_for(self, trust_domain: TrustDomain) -> TrustBundle | None:
        if trust_domain == self.trust_domain:
            return self._bundle
        return self._federated.get(trust_domain.name)

    # -- change notification ------------------------------------------------------------

    def version(self) -> int:
        return self._version

    async def wait_for_change(self, seen_version: int) -> int:
        while self._version == seen_version:
            await self._changed.wait()
        return self._version

    def _bump(self) -> None:
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _visible(self, selectors: Collection[Selector]) -> list[TrustBundle]:
        federates = {td for e in self.matching_entries(selectors) for td in e.federates_with}
        own = [self._bundle] if self._bundle is not None else []
        return own + [self._federated[td] for td in sorted(federates) if td in self._federated]

    @staticmethod
    def _ordered(entries: Iterable[AuthorizedEntry]) -> list[AuthorizedEntry]:
        """Oldest entry first, so a workload's default SVID stays the same as others come."""
        return sorted(entries, key=lambda e: (e.created_at, e.id))


def leaf_authority_id(leaf_der: bytes) -> str:
    """The hex authority key identifier of a DER certificate ("" without one)."""
    try:
        certificate = x509.load_der_x509_certificate(leaf_der)
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        return ""
    return (aki.value.key_identifier or b"").hex()


def jwt_key_id(token: str) -> str:
    """The ``kid`` of a JWS compact token's header ("" when unreadable)."""
    try:
        header = token.split(".", 1)[0]
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, UnicodeDecodeError):
        return ""
    return str(decoded.get("kid", "")) if isinstance(decoded, dict) else ""
