"""Who may get which SVID, and issuing it.

An agent may get SVIDs for the entries *authorized* for it: entries whose
parent is the agent itself or one of its aliases (a join token's
``--spiffe-id``, or a ``--node`` entry whose selectors the node matches), and,
transitively, entries parented by those entries' IDs. Every CSR is checked
(signature, key, exactly the entry's SPIFFE ID and DNS names, never a CA)
before anything is signed, and every issued SVID is recorded and written to
the audit log in the transaction that records it, before it is handed out.

Batches signed at about the same time (by one agent or several) are recorded
together (:mod:`ca.group_commit`): the batches that arrive while one write is in
flight make one transaction, with one ``x509svid.issue`` event per agent naming
every SVID of that agent's batches in the group. The entry revision is not
read for each batch: the batches are authorized at the revision the last group
was written at, and the group's transaction checks, before it writes, that the
revision is still that one; when it moved, each batch is checked again at the
new one, and signed again if one of its entries changed or is no longer
authorized for the agent.

    issuer = Issuer(settings, store, authorities, clock)
    entries = issuer.authorized_entries(agent)
    svids = issuer.sign_batch(agent, [(entry.id, csr_der)])
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestor.selector import matches
from ca import metrics
from ca.authority import Authorities
from ca.csr import checked_csr, parse_csr
from ca.datastore.interface import Datastore, RevisionMoved
from ca.datastore.records import AttestedAgent, AuditNote, IssuedSvid, RegistrationEntry
from ca.errors import AgentBanned
from ca.group_commit import GroupCommit
from ca.x509ca import SignedX509Svid
from sdk.clock import Clock
from sdk.errors import InvalidArgument, NotFound, PermissionDenied, TesseraError, Unavailable
from sdk.keys import KeyType, PrivateKey, PublicKey, generate_private_key
from sdk.spiffeid import SpiffeId, TrustDomain, parse_spiffe_id, require_member

log = logging.getLogger(__name__)

MAX_BATCH = 500
MAX_AUDIENCES = 32
MAX_GROUP_SVIDS = 2000
"""A group of batches recorded in one transaction stops growing at this many SVIDs."""
SIGNING_ROUNDS = 3
"""Times a batch is signed again when its entries change before it is recorded."""
REVISION_CHECKS = 3
"""Times a group is written on the condition that the entry revision has not moved."""
GROUP_GATHER_SECONDS = 0.005
"""How long the batches signed on the event loop wait for others to share their
transaction (and their audit event): one group's write costs about as much CPU as
signing a few SVIDs, and without the wait a server with a core to spare wrote groups of
two. An agent's renewal waits this much longer for its answer."""

# Audit actions of issuance; the admin API's mints are "x509.mint" and "jwt.mint".
AGENT_SVID_ISSUED = "agent.svid.issue"
X509_SVIDS_ISSUED = "x509svid.issue"
JWT_SVID_ISSUED = "jwtsvid.issue"


@dataclass(frozen=True)
class IssuanceSettings:
    trust_domain: TrustDomain
    default_x509_svid_ttl: timedelta
    default_jwt_svid_ttl: timedelta

    @property
    def server_id(self) -> SpiffeId:
        return SpiffeId(f"spiffe://{self.trust_domain.name}/tessera/server")


class IssuedX509:
    """An issued X509-SVID and the intermediates that go out with it.

    ``leaf`` is an ``x509.Certificate``, or the SVID as signed
    (:class:`ca.x509ca.SignedX509Svid`): then the DER is kept as signed and
    the certificate is parsed only if someone reads :attr:`leaf`.
    ``intermediates_der``, when given, is ``intermediates`` in DER.
    """

    __slots__ = (
        "_intermediates_der",
        "_leaf",
        "entry_id",
        "expires_at",
        "intermediates",
        "leaf_der",
        "serial_number",
        "spiffe_id",
    )

    def __init__(
        self,
        spiffe_id: SpiffeId,
        leaf: x509.Certificate | SignedX509Svid,
        intermediates: tuple[x509.Certificate, ...],
        entry_id: str | None = None,
        *,
        intermediates_der: tuple[bytes, ...] | None = None,
    ) -> None:
        self.spiffe_id = spiffe_id
        self.intermediates = intermediates
        self.entry_id = entry_id
        self._intermediates_der = intermediates_der
        self.serial_number = leaf.serial_number
        self._leaf: x509.Certificate | None
        if isinstance(leaf, SignedX509Svid):
            self._leaf = None
            self.leaf_der = leaf.der
            self.expires_at = leaf.not_after
        else:
            self._leaf = leaf
            self.leaf_der = leaf.public_bytes(serialization.Encoding.DER)
            self.expires_at = leaf.not_valid_after_utc

    @property
    def leaf(self) -> x509.Certificate:
        """The leaf certificate, parsed from its DER the first time it is asked for."""
        leaf = self._leaf
        if leaf is None:
            leaf = self._leaf = x509.load_der_x509_certificate(self.leaf_der)
        return leaf

    def chain_der(self) -> list[bytes]:
        """The leaf then the intermediates, in DER; nothing is encoded again."""
        intermediates = self._intermediates_der
        if intermediates is None:
            intermediates = self._intermediates_der = tuple(
                _authority_der(c) for c in self.intermediates
            )
        return [self.leaf_der, *intermediates]

    def chain_pem(self) -> bytes:
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.leaf, *self.intermediates)
        )

    def __repr__(self) -> str:
        return (
            f"IssuedX509(spiffe_id={str(self.spiffe_id)!r}, serial={self.serial_number:x}, "
            f"expires_at={self.expires_at.isoformat()}, entry_id={self.entry_id!r})"
        )


@dataclass(frozen=True)
class _SignedBatch:
    """A batch signed for an agent, waiting to be recorded with its group."""

    agent: AttestedAgent
    revision: int
    """The entry revision its entries were authorized at."""
    entries: tuple[RegistrationEntry, ...]
    """The entry of each SVID, as it was authorized and signed."""
    issued: tuple[IssuedX509, ...]
    records: tuple[IssuedSvid, ...]


class _EntriesChanged(Exception):
    """A batch's entries changed (or are no longer the agent's) before it was recorded."""


class Issuer:
    def __init__(
        self,
        settings: IssuanceSettings,
        store: Datastore,
        authorities: Authorities,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self._store = store
        self._authorities = authorities
        self._clock = clock
        self._cache: OrderedDict[
            tuple[str, int],
            tuple[list[RegistrationEntry], dict[str, RegistrationEntry], int | None],
        ] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.recording: GroupCommit[_SignedBatch] = GroupCommit(
            self._record_group, weight=lambda batch: len(batch.records),
            max_weight=MAX_GROUP_SVIDS, gather=GROUP_GATHER_SECONDS,
        )  # fmt: skip
        self._revision: int | None = None  # the entry revision the last group was checked at

    # -- authorization ------------------------------------------------------------

    def authorized_entries(
        self, agent: AttestedAgent, *, revision: int | None = None
    ) -> list[RegistrationEntry]:
        """Entries this agent may hold SVIDs for (cached per store revision).

        ``revision`` is the store's current revision when the caller has just read it.
        """
        return self._authorized(agent, revision)[0]

    def _authorized(
        self, agent: AttestedAgent, revision: int | None
    ) -> tuple[list[RegistrationEntry], dict[str, RegistrationEntry]]:
        """The agent's authorized entries in revision order, and by ID."""
        if revision is None:
            revision = self._store.current_revision()
        key = (agent.spiffe_id, revision)
        now = int(self._clock.now().timestamp())
        with self._cache_lock:
            cached = self._cache.get(key)
            # An entry expiring changes no revision: the list lasts until the first expiry.
            if cached is not None and (cached[2] is None or now < cached[2]):
                self._cache.move_to_end(key)
                return cached[0], cached[1]
        entries = self._compute_authorized(agent)
        by_id = {entry.id: entry for entry in entries}
        expiries = [e.expires_at for e in entries if e.expires_at is not None]
        with self._cache_lock:
            self._cache[key] = (entries, by_id, min(expiries, default=None))
            while len(self._cache) > 4096:
                self._cache.popitem(last=False)
        return entries, by_id

    def _cached_authorized(
        self, agent: AttestedAgent, revision: int
    ) -> dict[str, RegistrationEntry] | None:
        """The agent's authorized entries at ``revision`` by ID if memory has them."""
        key = (agent.spiffe_id, revision)
        now = int(self._clock.now().timestamp())
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and (cached[2] is None or now < cached[2]):
                self._cache.move_to_end(key)
                return cached[1]
        return None

    def _compute_authorized(self, agent: AttestedAgent) -> list[RegistrationEntry]:
        now = int(self._clock.now().timestamp())
        parents = {agent.spiffe_id, *self._store.agent_aliases(agent.spiffe_id)}
        server_id = str(self.settings.server_id)
        for node_entry in self._store.entries_by_parent([server_id]):
            if node_entry.node and matches(node_entry.selectors, agent.selectors):
                parents.add(node_entry.spiffe_id)
        seen_parents: set[str] = set()
        found: dict[str, RegistrationEntry] = {}
        frontier = parents
        while frontier:
            seen_parents |= frontier
            children = self._store.entries_by_parent(sorted(frontier))
            frontier = set()
            for entry in children:
                if entry.id in found or entry.node:
                    continue
                if entry.expires_at is not None and entry.expires_at <= now:
                    continue
                found[entry.id] = entry
                if entry.spiffe_id not in seen_parents:
                    frontier.add(entry.spiffe_id)
        return sorted(found.values(), key=lambda e: e.revision)

    def _authorized_entry(
        self,
        agent: AttestedAgent,
        entry_id: str,
        authorized: dict[str, RegistrationEntry] | None = None,
    ) -> RegistrationEntry:
        """The entry if it is authorized for the agent; ``authorized`` (by ID) saves a batch
        from reading the revision once per CSR."""
        if authorized is None:
            authorized = self._authorized(agent, None)[1]
        entry = authorized.get(entry_id)
        if entry is None:
            raise PermissionDenied(
                f"entry {entry_id} is not authorized for agent {agent.spiffe_id}"
            )
        return entry

    # -- X509-SVIDs ---------------------------------------------------------------

    def sign_agent_svid(self, agent_id: SpiffeId, csr_der: bytes) -> IssuedX509:
        checked = checked_csr(parse_csr(csr_der), spiffe_id=agent_id)
        ttl = self.settings.default_x509_svid_ttl
        return self._issue(
            agent_id, checked.public_key, ttl, (), AGENT_SVID_ISSUED, str(agent_id),
            checked.subject_public_key_info,
        )  # fmt: skip

    def sign_batch(
        self, agent: AttestedAgent, requests: Sequence[tuple[str, bytes]]
    ) -> list[IssuedX509]:
        """Sign one CSR per entry; every CSR is checked before any is signed. Returns
        once the SVIDs are recorded and audited (with the batches of the same moment)."""
        if len(requests) > MAX_BATCH:
            raise InvalidArgument(f"a batch takes at most {MAX_BATCH} CSRs; split it")
        for _ in range(SIGNING_ROUNDS):
            batch = self._sign_checked(agent, requests)
            try:
                self.recording.submit(batch)
            except _EntriesChanged:
                continue  # signed again at the revision the group read
            return list(batch.issued)
        raise Unavailable(
            f"the registration entries changed while the batch was signed, "
            f"{SIGNING_ROUNDS} times over; ask again"
        )

    async def sign_batch_async(
        self, agent: AttestedAgent, requests: Sequence[tuple[str, bytes]]
    ) -> list[IssuedX509] | None:
        """:meth:`sign_batch` on the event loop, when all it needs is in memory (the
        revision the last group was written at, the agent's authorized entries at it,
        every entry asked for among them): the batch is signed here and its write
        awaited in the group commit's thread. None, with nothing recorded, when the
        datastore must be read first: then call :meth:`sign_batch` in a worker thread.
        """
        if len(requests) > MAX_BATCH:
            raise InvalidArgument(f"a batch takes at most {MAX_BATCH} CSRs; split it")
        for _ in range(SIGNING_ROUNDS):
            revision = self._revision
            if revision is None:
                return None
            authorized = self._cached_authorized(agent, revision)
            if authorized is None or any(entry_id not in authorized for entry_id, _ in requests):
                return None
            batch = self._sign_authorized(agent, revision, authorized, requests)
            try:
                await self.recording.submit_async(batch)
            except _EntriesChanged:
                continue  # signed again at the revision the group read
            return list(batch.issued)
        raise Unavailable(
            f"the registration entries changed while the batch was signed, "
            f"{SIGNING_ROUNDS} times over; ask again"
        )

    def _sign_checked(
        self, agent: AttestedAgent, requests: Sequence[tuple[str, bytes]]
    ) -> _SignedBatch:
        """Authorize every entry and check every CSR, then sign them all.

        The entries are authorized at the revision the last group was written at (the
        next group checks it has not moved), or at the store's current revision when
        there was none, or when an entry is not authorized at that one.
        """
        revision = self._revision
        if revision is not None:
            authorized = self._authorized(agent, revision)[1]
        if revision is None or any(entry_id not in authorized for entry_id, _ in requests):
            revision = self._store.current_revision()
            authorized = self._authorized(agent, revision)[1]
            if self._revision is None or revision > self._revision:
                self._revision = revision
        return self._sign_authorized(agent, revision, authorized, requests)

    def _sign_authorized(
        self,
        agent: AttestedAgent,
        revision: int,
        authorized: dict[str, RegistrationEntry],
        requests: Sequence[tuple[str, bytes]],
    ) -> _SignedBatch:
        """Check every CSR against its entry (authorized at ``revision``), then sign."""
        checked = []
        for index, (entry_id, csr_der) in enumerate(requests):
            entry = self._authorized_entry(agent, entry_id, authorized)
            spiffe_id = SpiffeId(entry.spiffe_id)
            try:
                csr = checked_csr(
                    parse_csr(csr_der), spiffe_id=spiffe_id, dns_names=entry.dns_names
                )
            except InvalidArgument as err:
                raise InvalidArgument(f"CSR {index} (entry {entry_id}): {err.message}") from err
            checked.append((entry, spiffe_id, csr))
        issued = []
        records = []
        default_ttl = self.settings.default_x509_svid_ttl
        for entry, spiffe_id, csr in checked:
            ttl = timedelta(seconds=entry.x509_svid_ttl) or default_ttl
            svid, record = self._sign(
                spiffe_id,
                csr.public_key,
                ttl,
                entry.dns_names,
                agent.spiffe_id,
                subject_public_key_info=csr.subject_public_key_info,
                entry_id=entry.id,
            )
            issued.append(svid)
            records.append(record)
        return _SignedBatch(
            agent, revision, tuple(e for e, _, _ in checked), tuple(issued), tuple(records)
        )

    def _record_group(self, batches: Sequence[_SignedBatch]) -> list[BaseException | None]:
        """Record a group of signed batches in one transaction: the SVIDs, and one
        ``x509svid.issue`` event per agent.

        The transaction first checks that the entry revision is the one the batches
        were checked at (the newest any of them was authorized at); when it moved,
        each batch is checked again at the revision found, a batch whose entries
        changed or are no longer the agent's is left out (its caller signs it again),
        and the rest are written on that condition. After :data:`REVISION_CHECKS`
        such rounds, they are written with no condition. When the write fails for a
        reason one batch may cause, each batch is written alone; when the datastore
        is unavailable, every batch fails.
        """
        metrics.ISSUANCE_GROUP_BATCHES.observe(len(batches))
        outcomes: list[BaseException | None] = [None] * len(batches)
        revision = max(batch.revision for batch in batches)
        if self._revision is not None:
            revision = max(revision, self._revision)
        kept = list(range(len(batches)))
        for round_ in range(REVISION_CHECKS):
            for index in list(kept):
                batch = batches[index]
                if batch.revision != revision and not self._still_authorized(batch, revision):
                    outcomes[index] = _EntriesChanged()
                    kept.remove(index)
            if not kept:
                break
            condition = revision if round_ < REVISION_CHECKS - 1 else None
            try:
                self._write([batches[i] for i in kept], revision=condition)
            except RevisionMoved as moved:
                revision = self._revision = moved.revision
                continue
            except Unavailable as error:
                for index in kept:
                    outcomes[index] = error
            except TesseraError as error:
                if len(kept) == 1:
                    outcomes[kept[0]] = error
                else:
                    log.warning(
                        "recording %d batches together failed (%s); recording them one by one",
                        len(kept), error,
                    )  # fmt: skip
                    for index in kept:
                        outcomes[index] = self._write_alone(batches[index], condition)
            self._revision = revision
            break
        return outcomes

    def _write_alone(self, batch: _SignedBatch, revision: int | None) -> BaseException | None:
        try:
            self._write([batch], revision=revision)
        except RevisionMoved:
            return _EntriesChanged()
        except TesseraError as error:
            return error
        return None

    def _still_authorized(self, batch: _SignedBatch, revision: int) -> bool:
        """Every entry of the batch is authorized for its agent at ``revision``, unchanged."""
        now = self._authorized(batch.agent, revision)[1]
        return all(now.get(entry.id) == entry for entry in batch.entries)

    def _write(self, batches: Sequence[_SignedBatch], *, revision: int | None) -> None:
        events: dict[str, list[dict[str, Any]]] = {}
        for batch in batches:
            events.setdefault(batch.agent.spiffe_id, []).extend(
                {
                    "serial": record.serial,
                    "spiffe_id": record.spiffe_id,
                    "entry_id": svid.entry_id,
                    "authority_id": record.authority_id,
                    "expires_at": record.expires_at.isoformat(),
                }
                for svid, record in zip(batch.issued, batch.records, strict=True)
            )
        audits = [
            AuditNote(actor=agent_id, action=X509_SVIDS_ISSUED, target=agent_id,
                      details={"svids": svids})
            for agent_id, svids in events.items()
        ]  # fmt: skip
        records = [record for batch in batches for record in batch.records]
        self._store.record_issued_svids(records, audit=audits, revision=revision)

    def mint_x509(
        self,
        spiffe_id: str,
        *,
        ttl: timedelta | None,
        dns_names: Sequence[str] = (),
        key_type: KeyType = KeyType.EC_P256,
    ) -> tuple[IssuedX509, PrivateKey]:
        """Mint an SVID with a fresh key, for ``tessera server x509 mint``."""
        parsed = parse_spiffe_id(spiffe_id)
        require_member(parsed, self.settings.trust_domain, what="SPIFFE ID")
        key = generate_private_key(key_type)
        issued = self._issue(
            parsed, key.public_key(), ttl or self.settings.default_x509_svid_ttl,
            dns_names, "x509.mint", None,
        )
        return issued, key

    def _issue(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        ttl: timedelta,
        dns_names: Sequence[str],
        action: str,
        agent_id: str | None,
        subject_public_key_info: bytes | None = None,
    ) -> IssuedX509:
        """Sign one X509-SVID: an agent's own (the agent is the audit actor), or one the
        admin API mints (``agent_id`` None, actor "admin")."""
        svid, record = self._sign(
            spiffe_id,
            public_key,
            ttl,
            dns_names,
            agent_id,
            subject_public_key_info=subject_public_key_info,
        )
        audit = AuditNote(
            actor=agent_id or "admin",
            action=action,
            target=str(spiffe_id),
            details={
                "serial": record.serial,
                "authority_id": record.authority_id,
                "expires_at": record.expires_at.isoformat(),
            },
        )
        self._store.record_issued_svids([record], audit=audit)
        return svid

    def _sign(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        ttl: timedelta,
        dns_names: Sequence[str],
        agent_id: str | None,
        *,
        subject_public_key_info: bytes | None = None,
        entry_id: str | None = None,
    ) -> tuple[IssuedX509, IssuedSvid]:
        signed = self._authorities.sign_x509_svid_chain(
            spiffe_id,
            public_key,
            ttl=ttl,
            dns_names=dns_names,
            subject_public_key_info=subject_public_key_info,
        )
        leaf = signed.leaf
        record = IssuedSvid(
            serial=format(leaf.serial_number, "x"),
            spiffe_id=str(spiffe_id),
            kind="x509",
            agent_id=agent_id,
            authority_id=signed.authority.authority_id,
            expires_at=leaf.not_after,
        )
        issued = IssuedX509(
            spiffe_id,
            leaf,
            signed.intermediates,
            entry_id,
            intermediates_der=signed.intermediates_der,
        )
        return issued, record

    # -- JWT-SVIDs ----------------------------------------------------------------

    def jwt_for_agent(
        self, agent: AttestedAgent, entry_id: str, audience: Sequence[str]
    ) -> tuple[str, str, datetime]:
        entry = self._authorized_entry(agent, entry_id)
        ttl = timedelta(seconds=entry.jwt_svid_ttl) or self.settings.default_jwt_svid_ttl
        token, expires_at, authority_id = self._jwt(
            SpiffeId(entry.spiffe_id), audience, ttl, agent.spiffe_id
        )
        self._store.append_audit(
            actor=agent.spiffe_id, action=JWT_SVID_ISSUED, target=entry.spiffe_id,
            details={"entry_id": entry.id, "audience": list(audience),
                     "authority_id": authority_id, "expires_at": expires_at.isoformat()},
        )  # fmt: skip
        return entry.spiffe_id, token, expires_at

    def mint_jwt(
        self, spiffe_id: str, audience: Sequence[str], *, ttl: timedelta | None
    ) -> tuple[str, datetime]:
        parsed = parse_spiffe_id(spiffe_id)
        require_member(parsed, self.settings.trust_domain, what="SPIFFE ID")
        token, expires_at, authority_id = self._jwt(
            parsed, audience, ttl or self.settings.default_jwt_svid_ttl, None
        )
        self._store.append_audit(
            actor="admin", action="jwt.mint", target=str(parsed),
            details={"audience": list(audience), "authority_id": authority_id,
                     "expires_at": expires_at.isoformat()},
        )  # fmt: skip
        return token, expires_at

    def _jwt(
        self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: timedelta, agent_id: str | None
    ) -> tuple[str, datetime, str]:
        """A JWT-SVID, its expiry and the ID (``kid``) of the authority that signed it."""
        audiences = [a for a in audience if a]
        if not audiences:
            raise InvalidArgument("at least one audience is required, e.g. --audience db")
        if len(audiences) > MAX_AUDIENCES:
            raise InvalidArgument(f"at most {MAX_AUDIENCES} audiences are allowed")
        token, expires_at, authority = self._authorities.mint_jwt_svid(
            spiffe_id, audiences, ttl=ttl
        )
        return token, expires_at, authority.authority_id


@lru_cache(maxsize=16)
def _authority_der(certificate: x509.Certificate) -> bytes:
    """An intermediate's DER: the same few authorities go out with every SVID."""
    return certificate.public_bytes(serialization.Encoding.DER)


def agent_or_refuse(store: Datastore, spiffe_id: SpiffeId, serial: int) -> AttestedAgent:
    """The attested agent presenting this SVID, or PermissionDenied saying why not."""
    try:
        agent = store.get_agent(str(spiffe_id))
    except NotFound as err:
        raise PermissionDenied(
            f"{spiffe_id} is not an attested agent; it must attest again"
        ) from err
    if agent.banned:
        raise AgentBanned(f"agent {spiffe_id} is banned")
    presented = format(serial, "x")
    if presented == agent.serial:
        if agent.previous_serial:
            store.confirm_agent_serial(agent.spiffe_id)  # the renewed SVID is in use now
        return agent
    if agent.previous_serial and presented == agent.previous_serial:
        return agent  # the renewal's answer may not have reached the agent
    raise PermissionDenied(
        f"agent {spiffe_id} presented an SVID that is no longer its current one"
    )
