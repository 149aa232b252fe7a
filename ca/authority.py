"""The trust domain's signing authorities and their rotation.

Each server owns its own X.509 authority and JWT authority, kept as slots in
the CA journal (the ``authorities`` table): at most one *prepared* key
(published in the bundle, not yet signing), one *active* key (signing), and
*old* keys (still in the bundle until they expire). :meth:`Authorities.rotate`
runs on a timer with an injected clock:

- no active key: activate the prepared one, or make one;
- less than half of the active key's life left: prepare the next key;
- less than a sixth left: activate the prepared key, the active one turns old;
- an old key past its expiry leaves the journal and the bundle.

So every SVID validates across a switch: the next key sits in every bundle
before it signs anything. Without an upstream authority each X.509 authority
is self-signed and is itself a trust anchor; with one, the upstream signs each
authority and its roots are the trust anchors. The bundle is the union of the
live authorities of every server sharing the datastore.

    authorities = Authorities(config, store, key_manager, upstream=None, clock=clock)
    authorities.rotate()
    leaf, intermediates, authority = authorities.sign_x509_svid(spiffe_id, key, ttl=ttl)

Issuance keeps the leaf as signed (its DER), never parsing it::

    signed = authorities.sign_x509_svid_chain(spiffe_id, key, ttl=ttl)
    signed.leaf.der, signed.intermediates_der
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca import x509ca
from ca.datastore.interface import Datastore
from ca.datastore.records import Authority
from ca.jwtsvid import mint_jwt_svid
from ca.keymanager import KeyManager, Signer
from ca.upstream import UpstreamAuthority
from sdk.bundle import TrustBundle
from sdk.clock import Clock
from sdk.der import split_certificates
from sdk.errors import FailedPrecondition, NotFound, TesseraError
from sdk.keys import KeyType, PublicKey
from sdk.spiffeid import SpiffeId, TrustDomain

log = logging.getLogger(__name__)

X509 = "x509"
JWT = "jwt"
PREPARED = "prepared"
ACTIVE = "active"
OLD = "old"
CA_BACKDATE = timedelta(seconds=10)


@dataclass(frozen=True)
class AuthorityPolicy:
    trust_domain: TrustDomain
    server_id: str
    ca_ttl: timedelta
    x509_key_type: KeyType = KeyType.EC_P256
    jwt_key_type: KeyType = KeyType.EC_P256


@dataclass(frozen=True)
class SigningAuthority:
    """An active authority with its key, ready to sign."""

    record: Authority
    signer: Signer
    certificate: x509.Certificate | None
    chain: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    """What goes out with every SVID it signs: with an upstream authority, the
    authority's certificate and the chain up to the upstream roots; nothing otherwise
    (a self-signed authority is itself in the bundle)."""
    intermediates_der: tuple[bytes, ...]

    @property
    def not_after(self) -> datetime:
        return self.record.not_after


@dataclass(frozen=True)
class SignedX509Chain:
    """An X509-SVID as the active authority signed it, and what goes out along with it."""

    leaf: x509ca.SignedX509Svid
    intermediates: tuple[x509.Certificate, ...]
    intermediates_der: tuple[bytes, ...]
    authority: Authority


@dataclass(frozen=True)
class NextRotation:
    """When the journal's rules will next prepare and activate a key of one kind, by the
    active authority's life (None: not pending — already prepared, or nothing active)."""

    prepare_at: datetime | None
    activate_at: datetime | None


def next_rotation(authorities: Sequence[Authority]) -> NextRotation:
    """The next steps for one kind's ``authorities`` (one server's): prepare when less than
    half the active key's life is left (unless a key is prepared), activate the prepared
    key when less than a sixth is left (as :meth:`Authorities.rotate` does)."""
    active = next((a for a in authorities if a.status == ACTIVE), None)
    if active is None:
        return NextRotation(None, None)
    life = active.not_after - active.not_before
    prepared = any(a.status == PREPARED for a in authorities)
    return NextRotation(
        prepare_at=None if prepared else active.not_after - life / 2,
        activate_at=active.not_after - life / 6,
    )


class Authorities:
    def __init__(
        self,
        policy: AuthorityPolicy,
        store: Datastore,
        key_manager: KeyManager,
        *,
        upstream: UpstreamAuthority | None,
        clock: Clock,
    ) -> None:
        self.policy = policy
        self._store = store
        self._keys = key_manager
        self._upstream = upstream
        self._clock = clock
        self._lock = threading.RLock()
        self._active: dict[str, SigningAuthority] = {}
        self._bundle: TrustBundle | None = None
        self._bundle_sequence = -1
        self._tainted: list[str] = []

    # -- rotation -----------------------------------------------------------------

    def rotate(self) -> bool:
        """Advance the journal by the clock; True when the bundle changed."""
        with self._lock:
            changed = False
            for kind in (X509, JWT):
                changed |= self._rotate_kind(kind)
            if changed:
                self._store.bump_bundle_sequence()
            self._refresh_bundle(force=changed)
            return changed

    def _rotate_kind(self, kind: str) -> bool:
        now = self._clock.now()
        slots = self._own(kind)
        changed = False
        for old in [a for a in slots if a.status == OLD and a.not_after <= now]:
            self._drop(old)
            changed = True
        slots = self._own(kind)
        active = _first(slots, ACTIVE)
        prepared = _first(slots, PREPARED)
        if active is not None and (active.not_after <= now or not self._key_usable(active)):
            # Expired while the server was down, or its key is gone (memory key manager).
            self._store.set_authority_status(active.authority_id, OLD)
            active = None
            changed = True
        if prepared is not None and (prepared.not_after <= now or not self._key_usable(prepared)):
            self._drop(prepared)
            prepared = None
            changed = True
        if active is None:
            if prepared is None:
                prepared = self._create(kind)
            self._store.set_authority_status(prepared.authority_id, ACTIVE)
            log.info("activated %s authority %s", kind, prepared.authority_id)
            self._forget_active(kind)
            return True
        life = active.not_after - active.not_before
        left = active.not_after - now
        if prepared is None and left < life / 2:
            prepared = self._create(kind)
            log.info("prepared %s authority %s", kind, prepared.authority_id)
            changed = True
        if prepared is not None and left < life / 6:
            self._activate(kind, prepared.authority_id)
            changed = True
        if kind not in self._active:
            self._load_active(kind)
        return changed

    def prepare(self, kind: str) -> Authority:
        """Prepare the next key now (``localauthority ... prepare``)."""
        with self._lock:
            prepared = _first(self._own(kind), PREPARED)
            if prepared is not None:
                self._drop(prepared)
            created = self._create(kind)
            self._store.bump_bundle_sequence()
            self._refresh_bundle(force=True)
            self._audit("localauthority.prepare", created)
            return created

    def activate(self, kind: str) -> Authority:
        """Activate the prepared key now (``localauthority ... activate``)."""
        with self._lock:
            prepared = _first(self._own(kind), PREPARED)
            if prepared is None:
                raise FailedPrecondition(
                    f"there is no prepared {kind} authority to activate; "
                    f"run 'tessera server localauthority {kind} prepare' first"
                )
            self._activate(kind, prepared.authority_id)
            self._store.bump_bundle_sequence()
            self._refresh_bundle(force=True)
            activated = self._store.get_authority(prepared.authority_id)
            self._audit("localauthority.activate", activated)
            return activated

    def taint(self, kind: str, authority_id: str) -> Authority:
        """Mark a no-longer-active authority tainted: agents replace what it signed."""
        with self._lock:
            authority = self._find(kind, authority_id)
            if authority.tainted:
                raise FailedPrecondition(f"{kind} authority {authority_id} is already tainted")
            if authority.status == ACTIVE:
                raise FailedPrecondition(
                    f"{kind} authority {authority_id} is active and still signing; activate "
                    f"another first ('tessera server localauthority {kind} prepare', then "
                    f"'... {kind} activate'), then taint it"
                )
            tainted = self._store.set_authority_tainted(authority_id)
            self._store.bump_bundle_sequence()
            self._refresh_bundle(force=True)
            self._audit("localauthority.taint", tainted)
            return tainted

    def revoke(self, kind: str, authority_id: str) -> Authority:
        """Remove a tainted authority from the bundle: what it signed stops validating."""
        with self._lock:
            authority = self._find(kind, authority_id)
            if not authority.tainted:
                raise FailedPrecondition(
                    f"{kind} authority {authority_id} is not tainted; taint it first so agents "
                    f"replace the SVIDs it signed ('tessera server localauthority {kind} taint "
                    f"--authority-id {authority_id}'), then revoke it"
                )
            revoked = self._store.set_authority_revoked(authority_id)
            if authority.server_id == self.policy.server_id:
                self._keys.delete_key(authority.key_id)
            self._store.bump_bundle_sequence()
            self._refresh_bundle(force=True)
            self._audit("localauthority.revoke", revoked)
            return revoked

    def tainted_ids(self) -> list[str]:
        """IDs of tainted, unrevoked authorities (X.509 SKIs and JWT key IDs); read with
        the bundle, so every agent sync does not cost a query."""
        self.bundle()
        return self._tainted

    def _find(self, kind: str, authority_id: str) -> Authority:
        try:
            authority = self._store.get_authority(authority_id)
        except NotFound:
            authority = None
        if authority is None or authority.kind != kind:
            raise NotFound(
                f"no {kind} authority {authority_id}; list them with "
                f"'tessera server localauthority {kind} show'"
            )
        if authority.revoked:
            raise FailedPrecondition(f"{kind} authority {authority_id} is already revoked")
        return authority

    def list_authorities(self, kind: str) -> list[Authority]:
        return sorted(self._own(kind), key=lambda a: (_STATUS_ORDER[a.status], a.not_before))

    def _activate(self, kind: str, authority_id: str) -> None:
        for current in self._own(kind):
            if current.status == ACTIVE:
                self._store.set_authority_status(current.authority_id, OLD)
        self._store.set_authority_status(authority_id, ACTIVE)
        self._forget_active(kind)
        log.info("activated %s authority %s", kind, authority_id)

    def _create(self, kind: str) -> Authority:
        now = self._clock.now()
        key_type = self.policy.x509_key_type if kind == X509 else self.policy.jwt_key_type
        key_id = f"{kind}-{secrets.token_hex(8)}"
        signer = self._keys.generate_key(key_id, key_type)
        try:
            return self._record_authority(kind, key_id, key_type, signer, now)
        except BaseException:
            self._keys.delete_key(key_id)  # leave no orphan key behind a failed mint
            raise

    def _record_authority(
        self, kind: str, key_id: str, key_type: KeyType, signer: Signer, now: datetime
    ) -> Authority:
        not_before = now - CA_BACKDATE
        not_after = now + self.policy.ca_ttl
        public_key = signer.public_key()
        spki = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        certificate_der: bytes | None = None
        chain = b""
        roots = b""
        if kind == X509:
            if self._upstream is None:
                certificate = x509ca.build_ca_certificate(
                    trust_domain=self.policy.trust_domain,
                    public_key=public_key,
                    signer=signer,
                    issuer=None,
                    not_before=not_before,
                    not_after=not_after,
                )
            else:
                minted = self._upstream.mint_x509_ca(
                    trust_domain=self.policy.trust_domain,
                    public_key=public_key,
                    not_before=not_before,
                    not_after=not_after,
                    signer=signer,
                )
                certificate = minted.certificate
                chain = b"".join(_der(c) for c in minted.chain)
                roots = b"".join(_der(c) for c in minted.upstream_roots)
            certificate_der = _der(certificate)
            authority_id = _ski_hex(certificate)
            not_before = certificate.not_valid_before_utc
            not_after = certificate.not_valid_after_utc
        else:
            authority_id = secrets.token_urlsafe(24)
        record = Authority(
            authority_id=authority_id,
            kind=kind,
            server_id=self.policy.server_id,
            status=PREPARED,
            tainted=False,
            revoked=False,
            key_id=key_id,
            key_type=str(key_type),
            not_before=not_before,
            not_after=not_after,
            certificate=certificate_der,
            chain=chain,
            upstream_roots=roots,
            public_key=spki,
            created_at=now,
        )
        return self._store.add_authority(record)

    def _drop(self, authority: Authority) -> None:
        self._store.delete_authority(authority.authority_id)
        self._keys.delete_key(authority.key_id)
        log.info("removed expired %s authority %s", authority.kind, authority.authority_id)

    def _key_usable(self, authority: Authority) -> bool:
        try:
            self._keys.get_key(authority.key_id)
        except NotFound:
            return False
        return True

    def _own(self, kind: str) -> list[Authority]:
        return self._store.list_authorities(kind=kind, server_id=self.policy.server_id)

    def _forget_active(self, kind: str) -> None:
        self._active.pop(kind, None)

    def _load_active(self, kind: str) -> SigningAuthority:
        active = _first(self._own(kind), ACTIVE)
        if active is None:
            raise FailedPrecondition(f"this server has no active {kind} authority yet")
        certificate = (
            x509.load_der_x509_certificate(active.certificate) if active.certificate else None
        )
        chain = tuple(split_certificates(active.chain)) if active.chain else ()
        intermediates: tuple[x509.Certificate, ...] = ()
        if self._upstream is not None and certificate is not None:
            intermediates = (certificate, *chain)
        signing = SigningAuthority(
            active,
            self._keys.get_key(active.key_id),
            certificate,
            chain,
            intermediates,
            tuple(_der(c) for c in intermediates),
        )
        self._active[kind] = signing
        return signing

    def active(self, kind: str) -> SigningAuthority:
        signing = self._active.get(kind)
        if signing is None:
            with self._lock:
                signing = self._active.get(kind) or self._load_active(kind)
        return signing

    # -- signing ------------------------------------------------------------------

    def sign_x509_svid(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        *,
        ttl: timedelta,
        dns_names: Sequence[str] = (),
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...], Authority]:
        """Issue an X509-SVID; returns the leaf, the intermediates and the authority."""
        signed = self.sign_x509_svid_chain(spiffe_id, public_key, ttl=ttl, dns_names=dns_names)
        return signed.leaf.certificate(), signed.intermediates, signed.authority

    def sign_x509_svid_chain(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        *,
        ttl: timedelta,
        dns_names: Sequence[str] = (),
        subject_public_key_info: bytes | None = None,
    ) -> SignedX509Chain:
        """Issue an X509-SVID with the active X.509 authority, keeping it as signed (DER).

        ``subject_public_key_info`` is ``public_key``'s SubjectPublicKeyInfo DER when
        the caller has it already (a checked CSR does).
        """
        signing = self.active(X509)
        assert signing.certificate is not None
        leaf = x509ca.x509_svid_template(signing.certificate, signing.signer).sign(
            spiffe_id=spiffe_id,
            public_key=public_key,
            now=self._clock.now(),
            ttl=ttl,
            dns_names=dns_names,
            subject_public_key_info=subject_public_key_info,
        )
        return SignedX509Chain(
            leaf, signing.intermediates, signing.intermediates_der, signing.record
        )

    def mint_jwt_svid(
        self, spiffe_id: SpiffeId, audience: Sequence[str], *, ttl: timedelta
    ) -> tuple[str, datetime, Authority]:
        signing = self.active(JWT)
        now = self._clock.now()
        ttl = min(ttl, signing.not_after - now)
        token = mint_jwt_svid(
            spiffe_id=spiffe_id,
            audience=audience,
            signer=signing.signer,
            kid=signing.record.authority_id,
            now=now,
            ttl=ttl,
        )
        return token, now + ttl, signing.record

    # -- the bundle ---------------------------------------------------------------

    def bundle(self) -> TrustBundle:
        """The trust domain's bundle: every server's live authorities."""
        bundle = self._bundle
        if bundle is None:
            with self._lock:
                bundle = self._refresh_bundle(force=True)
        return bundle

    def refresh_bundle(self) -> bool:
        """Re-read the bundle if another server changed it; True when it changed."""
        with self._lock:
            before = self._bundle_sequence
            self._refresh_bundle(force=False)
            return self._bundle_sequence != before

    def _refresh_bundle(self, *, force: bool) -> TrustBundle:
        sequence = self._store.bundle_sequence()
        if not force and self._bundle is not None and sequence == self._bundle_sequence:
            return self._bundle
        now = self._clock.now()
        anchors: dict[bytes, x509.Certificate] = {}
        jwt_keys: dict[str, PublicKey] = {}
        authorities = self._store.list_authorities()
        self._tainted = sorted(a.authority_id for a in authorities if a.tainted)
        for authority in authorities:
            if authority.not_after <= now:
                continue
            if authority.kind == X509:
                der_blobs = [authority.upstream_roots] if authority.upstream_roots else []
                if not der_blobs and authority.certificate:
                    der_blobs = [authority.certificate]
                for blob in der_blobs:
                    for cert in split_certificates(blob):
                        anchors.setdefault(_der(cert), cert)
            else:
                key = serialization.load_der_public_key(authority.public_key)
                jwt_keys[authority.authority_id] = key  # type: ignore[assignment]
        self._bundle = TrustBundle(
            trust_domain=self.policy.trust_domain,
            x509_authorities=tuple(anchors.values()),
            jwt_authorities=jwt_keys,
            sequence=sequence,
            refresh_hint=refresh_hint(self.policy.ca_ttl),
        )
        self._bundle_sequence = sequence
        return self._bundle

    def jwt_keys(self) -> Mapping[str, PublicKey]:
        return self.bundle().jwt_authorities

    def _audit(self, action: str, authority: Authority) -> None:
        try:
            self._store.append_audit(
                actor="admin",
                action=action,
                target=authority.authority_id,
                details={"kind": authority.kind, "server_id": authority.server_id},
            )
        except TesseraError:
            log.exception("could not write the audit event for %s", action)


_STATUS_ORDER = {ACTIVE: 0, PREPARED: 1, OLD: 2}


def refresh_hint(ca_ttl: timedelta) -> int:
    """How often bundle consumers should refresh: a tenth of the CA TTL, 5 min at most."""
    return max(1, min(300, int(ca_ttl.total_seconds() // 10)))


def _first(authorities: Sequence[Authority], status: str) -> Authority | None:
    matching = [a for a in authorities if a.status == status and not a.revoked]
    return max(matching, key=lambda a: a.not_before) if matching else None


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _ski_hex(cert: x509.Certificate) -> str:
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return ski.digest.hex()
