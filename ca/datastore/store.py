"""The server's datastore: registration entries, agents, join tokens, the CA
journal, federated bundles and federation relationships, issued SVIDs and the
audit log.

SQLite (the embedded default) and PostgreSQL (several servers on one
database) behave the same; a contract suite runs against both::

    store = Datastore.open("sqlite:////var/lib/tessera/datastore.sqlite3")
    entry = store.create_entry(NewEntry(spiffe_id, parent_id, selectors=(selector,)))
    changed = store.entries_changed_since(agent_revision)   # live entries and tombstones
    store.close()

Opening migrates the schema (see :mod:`ca.datastore.migrate`). Each method is
one transaction on its own session, so the store may be called from many
threads; a method that fails leaves nothing half-written. Records returned
are frozen dataclasses (:mod:`ca.datastore.records`), never ORM objects.

Every change to the entries, and to an agent's aliases, takes the next value
of one global *entry revision* counter in the same transaction. Entry writers
take it first, so on PostgreSQL they queue on that row and revisions follow
commit order: an agent that has seen revision N has seen everything up to N.
Deleting an entry leaves a tombstone carrying its deletion revision, so
incremental sync (:meth:`Datastore.entries_changed_since`) learns of it.

The *bundle sequence* counter says "the bundles agents receive changed": it is
bumped when this trust domain's authorities change, and when a federation
relationship's change adds, replaces or removes a federated bundle, so agents
long-polling on it wake up.

The *agents* counter is bumped by every change to an attested agent (attest,
renew, confirming a renewed SVID, ban, unban, evict), so a server caching agent
records hears of other servers' changes by reading it
(:meth:`Datastore.sync_counters`). Changes made through this store are also
told at once, after their transaction ends, to the listeners added with
:meth:`Datastore.on_agent_change`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from sqlalchemy import (
    ColumnElement,
    Insert,
    Table,
    and_,
    delete,
    func,
    insert,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, aliased, sessionmaker

from attestor.selector import Selector
from ca.datastore.audit import GENESIS, event_digest
from ca.datastore.engine import Engines, create_engines
from ca.datastore.migrate import upgrade
from ca.datastore.records import (
    AUTHORITY_KINDS,
    AUTHORITY_STATUSES,
    BUNDLE_ENDPOINT_PROFILES,
    SELECTOR_MATCHES,
    AttestedAgent,
    AuditEvent,
    AuditNote,
    AuditVerification,
    Authority,
    FederatedBundle,
    FederationRelationship,
    IssuedSvid,
    JoinToken,
    NewEntry,
    NewFederationRelationship,
    RegistrationEntry,
    ServerLease,
    SharedRoot,
)
from ca.datastore.schema import (
    AGENT_CHANGES,
    BUNDLE_SEQUENCE,
    ENTRY_REVISION,
    TOMBSTONE_HORIZON,
    AgentAliasRow,
    AgentRow,
    AgentSelectorRow,
    AuditEventRow,
    AuditHeadRow,
    AuthorityRow,
    CounterRow,
    EntryRow,
    EntrySelectorRow,
    FederatedBundleRow,
    FederationRelationshipRow,
    IssuedSvidRow,
    JoinTokenRow,
    ServerLeaseRow,
    SharedRootRow,
)
from ca.datastore.translate import translate_errors
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable

# Parent IDs per query in entries_by_parent; keeps far below every driver's
# limit on bound parameters.
_IN_CHUNK = 500

AgentChangeListener = Callable[[str, int | None], None]
"""Called with an agent's SPIFFE ID after a transaction that changed it (or tried to)
ended, and the agents counter's value that change took: None when the transaction
may not have committed."""


class Datastore:
    """The server's persistent state. Create with :meth:`open`."""

    def __init__(self, engines: Engines, clock: Clock) -> None:
        self._engines = engines
        self._clock = clock
        self._reads = sessionmaker(bind=engines.reads, expire_on_commit=False, autoflush=False)
        self._writes = sessionmaker(bind=engines.writes, expire_on_commit=False, autoflush=False)
        self._closed = False
        self._agent_listeners: list[AgentChangeListener] = []

    @classmethod
    def open(cls, url: str, *, clock: Clock = SYSTEM_CLOCK) -> Datastore:
        """Connect, create or migrate the schema, and return the store.

        ConfigError for a bad URL or an unwritable SQLite path, Unavailable when
        the database does not answer, FailedPrecondition for a schema newer
        than this Tessera.
        """
        engines = create_engines(url)
        try:
            with translate_errors():
                upgrade(engines.writes)
        except BaseException:
            engines.engine.dispose()
            raise
        return cls(engines, clock)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engines.dialect

    def close(self) -> None:
        """Close every pooled connection; later calls raise Unavailable."""
        self._closed = True
        with translate_errors():
            self._engines.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def ping(self) -> None:
        """Return when the database answers; Unavailable otherwise."""
        with self._reading() as session:
            session.execute(text("SELECT 1"))

    # -- sessions: the one boundary where SQLAlchemy errors are translated -----

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        self._check_open()
        with translate_errors(), self._reads.begin() as session:
            yield session

    @contextmanager
    def _writing(self, *, conflict: str = "the record exists already") -> Iterator[Session]:
        self._check_open()
        with translate_errors(conflict=conflict), self._writes.begin() as session:
            yield session

    @contextmanager
    def _changing_agent(self, spiffe_id: str) -> Iterator[Session]:
        """A write transaction changing the agent: it bumps the agents counter when the
        body succeeds, and the listeners hear of it once the transaction has ended."""
        value: int | None = None
        try:
            with self._writing() as session:
                yield session
                bumped = _bump(session, AGENT_CHANGES)
            value = bumped
        finally:
            for listener in self._agent_listeners:
                listener(spiffe_id, value)

    def on_agent_change(self, listener: AgentChangeListener) -> None:
        """Call ``listener`` after every agent change made through this store, in the
        thread that made it; it must be quick and must not raise."""
        self._agent_listeners.append(listener)

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the datastore is closed; the server is shutting down")

    # -- registration entries ---------------------------------------------------

    def create_entry(self, entry: NewEntry, *, audited_by: str | None = None) -> RegistrationEntry:
        """Store a new entry; AlreadyExists if a live entry has the same SPIFFE ID,
        parent ID and selector set. With ``audited_by``, the ``entry.create`` audit
        event (by that actor) is written in the same transaction."""
        selectors = _normalise(entry.selectors)
        key = _live_key(entry.spiffe_id, entry.parent_id, selectors)
        entry_id = str(uuid.uuid4())
        now = self._clock.now()
        with self._writing(conflict=_entry_conflict(entry)) as session:
            revision = _bump(session, ENTRY_REVISION)
            _refuse_duplicate_entry(session, entry, key, entry_id)
            session.execute(
                insert(EntryRow).values(
                    id=entry_id,
                    live_key=key,
                    revision=revision,
                    created_at=now,
                    deleted=False,
                    **_entry_columns(entry),
                )
            )
            _insert_entry_selectors(session, entry_id, selectors)
            if audited_by is not None:
                _audit_entry(session, audited_by, "entry.create", entry_id, entry.spiffe_id, now)
        return _entry_record_from(entry_id, entry, selectors, revision, now)

    def get_entry(self, entry_id: str) -> RegistrationEntry:
        with self._reading() as session:
            row = session.scalar(select(EntryRow).where(_live_entry(entry_id)))
            if row is None:
                raise _entry_not_found(entry_id)
            return _entry_record(row)

    def update_entry(
        self, entry_id: str, entry: NewEntry, *, audited_by: str | None = None
    ) -> RegistrationEntry:
        """Replace every caller-owned field of the entry; the entry gets a new revision.
        ``audited_by`` as for :meth:`create_entry` (event ``entry.update``)."""
        selectors = _normalise(entry.selectors)
        key = _live_key(entry.spiffe_id, entry.parent_id, selectors)
        with self._writing(conflict=_entry_conflict(entry)) as session:
            revision = _bump(session, ENTRY_REVISION)
            created_at = session.scalar(select(EntryRow.created_at).where(_live_entry(entry_id)))
            if created_at is None:
                raise _entry_not_found(entry_id)
            _refuse_duplicate_entry(session, entry, key, entry_id)
            session.execute(
                update(EntryRow)
                .where(EntryRow.id == entry_id)
                .values(live_key=key, revision=revision, **_entry_columns(entry))
                .execution_options(synchronize_session=False)
            )
            session.execute(delete(EntrySelectorRow).where(EntrySelectorRow.entry_id == entry_id))
            _insert_entry_selectors(session, entry_id, selectors)
            if audited_by is not None:
                _audit_entry(
                    session, audited_by, "entry.update", entry_id, entry.spiffe_id,
                    self._clock.now(),
                )
        return _entry_record_from(entry_id, entry, selectors, revision, created_at)

    def delete_entry(self, entry_id: str, *, audited_by: str | None = None) -> RegistrationEntry:
        """Delete the entry, leaving a tombstone (``deleted=True``, a new revision)
        for incremental sync; returns the tombstone. ``audited_by`` as for
        :meth:`create_entry` (event ``entry.delete``)."""
        with self._writing() as session:
            revision = _bump(session, ENTRY_REVISION)
            row = session.scalar(select(EntryRow).where(_live_entry(entry_id)))
            if row is None:
                raise _entry_not_found(entry_id)
            record = _entry_record(row)
            session.execute(
                update(EntryRow)
                .where(EntryRow.id == entry_id)
                .values(deleted=True, live_key=None, revision=revision)
                .execution_options(synchronize_session=False)
            )
            if audited_by is not None:
                _audit_entry(
                    session, audited_by, "entry.delete", entry_id, record.spiffe_id,
                    self._clock.now(),
                )
        return replace(record, deleted=True, revision=revision)

    def list_entries(
        self,
        *,
        spiffe_id: str | None = None,
        parent_id: str | None = None,
        selectors: Sequence[Selector] | None = None,
        selector_match: str = "superset",
        limit: int | None = None,
        offset: int = 0,
    ) -> list[RegistrationEntry]:
        """Live entries matching every filter given, oldest first.

        ``selector_match`` says how an entry's selectors relate to ``selectors``:
        ``exact`` (the same set), ``subset`` (all of the entry's are among them:
        the entries a workload with these selectors gets), ``superset`` (the
        entry has all of them, maybe more) or ``any`` (at least one in common).
        """
        query = select(EntryRow).where(EntryRow.deleted.is_(False))
        if spiffe_id is not None:
            query = query.where(EntryRow.spiffe_id == spiffe_id)
        if parent_id is not None:
            query = query.where(EntryRow.parent_id == parent_id)
        if selectors is not None:
            query = query.where(_selector_filter(selectors, selector_match))
        if (limit is not None and limit < 0) or offset < 0:
            raise InvalidArgument("limit and offset must not be negative")
        query = query.order_by(EntryRow.created_at, EntryRow.id).offset(offset).limit(limit)
        with self._reading() as session:
            return [_entry_record(row) for row in session.scalars(query)]

    def count_entries(self) -> int:
        """The number of live entries."""
        query = select(func.count()).select_from(EntryRow).where(EntryRow.deleted.is_(False))
        with self._reading() as session:
            return session.scalar(query) or 0

    def entries_by_parent(self, parent_ids: Collection[str]) -> list[RegistrationEntry]:
        """Live entries whose parent ID is one of ``parent_ids`` (an agent and its aliases)."""
        wanted = sorted(set(parent_ids))
        entries: list[RegistrationEntry] = []
        with self._reading() as session:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                query = select(EntryRow).where(
                    EntryRow.parent_id.in_(chunk), EntryRow.deleted.is_(False)
                )
                entries.extend(_entry_record(row) for row in session.scalars(query))
        return sorted(entries, key=lambda entry: (entry.created_at, entry.id))

    def entries_changed_since(self, revision: int) -> list[RegistrationEntry]:
        """Live entries and tombstones whose revision is above ``revision``, in
        revision order. Purged tombstones are gone: see :meth:`purged_revision`."""
        query = select(EntryRow).where(EntryRow.revision > revision).order_by(EntryRow.revision)
        with self._reading() as session:
            return [_entry_record(row) for row in session.scalars(query)]

    def current_revision(self) -> int:
        """The global entry revision: 0 for a new store, then one more per change."""
        with self._reading() as session:
            return _counter(session, ENTRY_REVISION)

    def agent_changes(self) -> int:
        """The agents counter: 0 for a new store, then one more per agent change."""
        with self._reading() as session:
            return _counter(session, AGENT_CHANGES)

    def sync_counters(self) -> tuple[int, int, int]:
        """(entry revision, bundle sequence, agents counter), read together in one
        query: what a server follows to hear of changes made by others."""
        names = (ENTRY_REVISION, BUNDLE_SEQUENCE, AGENT_CHANGES)
        query = select(CounterRow.name, CounterRow.value).where(CounterRow.name.in_(names))
        with self._reading() as session:
            values = {name: int(value) for name, value in session.execute(query)}
        return values[ENTRY_REVISION], values[BUNDLE_SEQUENCE], values[AGENT_CHANGES]

    def purge_tombstones(self, before_revision: int) -> int:
        """Forget tombstones older than ``before_revision``; returns how many."""
        with self._writing() as session:
            removed = session.connection().execute(
                delete(_table(EntryRow)).where(
                    EntryRow.deleted.is_(True), EntryRow.revision < before_revision
                )
            )
            session.execute(
                update(CounterRow)
                .where(CounterRow.name == TOMBSTONE_HORIZON, CounterRow.value < before_revision)
                .values(value=before_revision)
                .execution_options(synchronize_session=False)
            )
            return removed.rowcount

    def purged_revision(self) -> int:
        """The highest ``before_revision`` purged so far. A client last synced
        below it may have missed deletions and must sync in full."""
        with self._reading() as session:
            return _counter(session, TOMBSTONE_HORIZON)

    # -- agents -----------------------------------------------------------------

    def upsert_agent(
        self,
        spiffe_id: str,
        *,
        attestation_type: str,
        serial: str,
        expires_at: datetime,
        selectors: Sequence[Selector] = (),
    ) -> AttestedAgent:
        """Record an attested agent, or refresh one that attests again (its
        ``banned`` flag, aliases and ``created_at`` stay)."""
        now = self._clock.now()
        values: dict[str, Any] = {
            "spiffe_id": spiffe_id,
            "attestation_type": attestation_type,
            "serial": serial,
            "previous_serial": "",
            "expires_at": expires_at,
            "banned": False,
            "created_at": now,
            "updated_at": now,
        }
        with self._changing_agent(spiffe_id) as session:
            self._upsert_agent_rows(session, values, selectors)
            agent = _agent_record(_agent_row(session, spiffe_id))
        return agent

    def register_agent(
        self,
        spiffe_id: str,
        *,
        attestation_type: str,
        serial: str,
        expires_at: datetime,
        selectors: Sequence[Selector] = (),
        aliases: Sequence[str] = (),
        join_token: str | None = None,
        audit: AuditNote | None = None,
    ) -> AttestedAgent:
        """Record an agent that attested, in one transaction: redeem its ``join_token``
        (NotFound if another attestation used it meanwhile, FailedPrecondition if it
        expired), then :meth:`upsert_agent`, its ``aliases`` and the ``audit`` event.
        A refusal leaves the token, the agent and the log as they were."""
        now = self._clock.now()
        values: dict[str, Any] = {
            "spiffe_id": spiffe_id,
            "attestation_type": attestation_type,
            "serial": serial,
            "previous_serial": "",
            "expires_at": expires_at,
            "banned": False,
            "created_at": now,
            "updated_at": now,
        }
        recorded = _audit_details(audit.details) if audit is not None else {}
        with self._changing_agent(spiffe_id) as session:
            if join_token is not None:
                _redeem_join_token(session, join_token, now)
            self._upsert_agent_rows(session, values, selectors)
            added = False
            for alias in dict.fromkeys(aliases):
                statement = _insert_on_conflict(
                    self.dialect,
                    AgentAliasRow,
                    {"agent_id": spiffe_id, "alias_id": alias},
                    keys=("agent_id", "alias_id"),
                )
                # RETURNING names the row only when it was inserted.
                inserted = session.execute(statement.returning(AgentAliasRow.alias_id)).first()
                added = added or inserted is not None
            if added:
                _bump(session, ENTRY_REVISION)
            if audit is not None:
                _append_audit(session, now, audit.actor, audit.action, audit.target, recorded)
            agent = _agent_record(_agent_row(session, spiffe_id))
        return agent

    def _upsert_agent_rows(
        self, session: Session, values: dict[str, Any], selectors: Sequence[Selector]
    ) -> None:
        spiffe_id = values["spiffe_id"]
        # Attesting again invalidates every SVID the agent held before.
        refreshed = ("attestation_type", "serial", "previous_serial", "expires_at", "updated_at")
        session.connection().execute(
            _insert_on_conflict(
                self.dialect,
                AgentRow,
                values,
                keys=("spiffe_id",),
                changes={name: values[name] for name in refreshed},
            )
        )
        session.execute(delete(AgentSelectorRow).where(AgentSelectorRow.agent_id == spiffe_id))
        rows = [
            {"agent_id": spiffe_id, "type": s.type, "value": s.value}
            for s in _normalise(selectors)
        ]
        if rows:
            session.execute(insert(AgentSelectorRow), rows)

    def get_agent(self, spiffe_id: str) -> AttestedAgent:
        with self._reading() as session:
            return _agent_record(_agent_row(session, spiffe_id))

    def list_agents(self) -> list[AttestedAgent]:
        with self._reading() as session:
            rows = session.scalars(select(AgentRow).order_by(AgentRow.spiffe_id))
            return [_agent_record(row) for row in rows]

    def count_agents(self) -> int:
        with self._reading() as session:
            return session.scalar(select(func.count()).select_from(AgentRow)) or 0

    def update_agent_serial(
        self, spiffe_id: str, serial: str, expires_at: datetime
    ) -> AttestedAgent:
        """Record the serial and expiry of the agent's renewed SVID; the serial it
        replaces stays acceptable until :meth:`confirm_agent_serial`."""
        with self._changing_agent(spiffe_id) as session:
            row = _agent_row(session, spiffe_id)
            row.previous_serial = row.serial
            row.serial = serial
            row.expires_at = expires_at
            row.updated_at = self._clock.now()
            session.flush()
            agent = _agent_record(row)
        return agent

    def confirm_agent_serial(self, spiffe_id: str) -> None:
        """The agent used its renewed SVID: the one before it is no longer accepted."""
        with self._changing_agent(spiffe_id) as session:
            row = _agent_row(session, spiffe_id)
            row.previous_serial = ""

    def set_agent_banned(self, spiffe_id: str, banned: bool) -> AttestedAgent:
        with self._changing_agent(spiffe_id) as session:
            row = _agent_row(session, spiffe_id)
            row.banned = banned
            row.updated_at = self._clock.now()
            session.flush()
            agent = _agent_record(row)
        return agent

    def delete_agent(self, spiffe_id: str) -> None:
        """Evict the agent (it must attest again); its selectors and aliases go
        too, and losing aliases bumps the entry revision."""
        with self._changing_agent(spiffe_id) as session:
            connection = session.connection()
            aliases = connection.execute(
                delete(_table(AgentAliasRow)).where(AgentAliasRow.agent_id == spiffe_id)
            )
            removed = connection.execute(
                delete(_table(AgentRow)).where(AgentRow.spiffe_id == spiffe_id)
            )
            if removed.rowcount == 0:
                raise _agent_not_found(spiffe_id)
            if aliases.rowcount:
                _bump(session, ENTRY_REVISION)

    def add_agent_alias(self, agent_id: str, alias_id: str) -> None:
        """Let the agent also answer for ``alias_id`` (entries parented to the
        alias go to the agent). Idempotent; a new alias bumps the entry revision."""
        conflict = f"agent {agent_id} was evicted while its alias was added; let it attest again"
        with self._writing(conflict=conflict) as session:
            agent = select(AgentRow.spiffe_id).where(AgentRow.spiffe_id == agent_id)
            if session.scalar(agent) is None:
                raise _agent_not_found(agent_id)
            statement = _insert_on_conflict(
                self.dialect,
                AgentAliasRow,
                {"agent_id": agent_id, "alias_id": alias_id},
                keys=("agent_id", "alias_id"),
            )
            # RETURNING names the row only when it was inserted (rowcount of an
            # INSERT is not reported by every driver).
            added = session.execute(statement.returning(AgentAliasRow.alias_id)).first()
            if added is not None:
                _bump(session, ENTRY_REVISION)

    def agent_aliases(self, agent_id: str) -> set[str]:
        """The aliases of the agent (empty for an unknown agent)."""
        query = select(AgentAliasRow.alias_id).where(AgentAliasRow.agent_id == agent_id)
        with self._reading() as session:
            return set(session.scalars(query))

    # -- join tokens ------------------------------------------------------------

    def create_join_token(
        self, token: str, *, alias_id: str | None, expires_at: datetime
    ) -> JoinToken:
        with self._writing(conflict="this join token exists already; generate another") as session:
            session.execute(
                insert(JoinTokenRow).values(token=token, alias_id=alias_id, expires_at=expires_at)
            )
        return JoinToken(token=token, alias_id=alias_id, expires_at=_stored_time(expires_at))

    def find_join_token(self, token: str) -> JoinToken:
        """An unused, unexpired join token, left unused (:meth:`register_agent` redeems it).

        NotFound if unknown or used already; FailedPrecondition if expired.
        """
        with self._reading() as session:
            row = session.get(JoinTokenRow, token)
            found = (
                None
                if row is None
                else JoinToken(token=token, alias_id=row.alias_id, expires_at=row.expires_at)
            )
        if found is None:
            raise _join_token_not_found()
        if found.expires_at <= self._clock.now():
            raise _join_token_expired(found.expires_at)
        return found

    def consume_join_token(self, token: str) -> JoinToken:
        """Use a join token up: it is deleted whatever happens next.

        NotFound if unknown or used already; FailedPrecondition if expired
        (an expired token is deleted as well).
        """
        with self._writing() as session:
            row = session.execute(
                delete(JoinTokenRow)
                .where(JoinTokenRow.token == token)
                .returning(JoinTokenRow.alias_id, JoinTokenRow.expires_at)
                .execution_options(synchronize_session=False)
            ).first()
        if row is None:
            raise _join_token_not_found()
        consumed = JoinToken(token=token, alias_id=row.alias_id, expires_at=row.expires_at)
        if consumed.expires_at <= self._clock.now():
            raise _join_token_expired(consumed.expires_at)
        return consumed

    def list_join_tokens(self) -> list[JoinToken]:
        query = select(JoinTokenRow).order_by(JoinTokenRow.expires_at, JoinTokenRow.token)
        with self._reading() as session:
            return [
                JoinToken(token=row.token, alias_id=row.alias_id, expires_at=row.expires_at)
                for row in session.scalars(query)
            ]

    def prune_join_tokens(self) -> int:
        """Delete expired join tokens; returns how many."""
        with self._writing() as session:
            result = session.connection().execute(
                delete(_table(JoinTokenRow)).where(JoinTokenRow.expires_at <= self._clock.now())
            )
            return result.rowcount

    # -- CA journal -------------------------------------------------------------

    def add_authority(self, authority: Authority) -> Authority:
        """Journal a new CA key slot; AlreadyExists for a known authority ID."""
        _check_choice("authority kind", authority.kind, AUTHORITY_KINDS)
        _check_choice("authority status", authority.status, AUTHORITY_STATUSES)
        conflict = f"authority {authority.authority_id} is in the CA journal already"
        with self._writing(conflict=conflict) as session:
            row = AuthorityRow(**{f: getattr(authority, f) for f in _AUTHORITY_FIELDS})
            session.add(row)
            session.flush()
            return _authority_record(row)

    # -- shared roots -------------------------------------------------------------

    def add_shared_root(self, root: SharedRoot) -> SharedRoot:
        """Store the next shared root; AlreadyExists if another server stored that
        generation first (then read theirs with :meth:`list_shared_roots`)."""
        conflict = f"shared root generation {root.generation} exists already"
        with self._writing(conflict=conflict) as session:
            row = SharedRootRow(**{f: getattr(root, f) for f in _SHARED_ROOT_FIELDS})
            session.add(row)
            session.flush()
            return _shared_root_record(row)

    def list_shared_roots(self) -> list[SharedRoot]:
        """Every shared root, oldest generation first."""
        query = select(SharedRootRow).order_by(SharedRootRow.generation)
        with self._reading() as session:
            return [_shared_root_record(row) for row in session.scalars(query)]

    # -- server leases: one running process per server ID -----------------------

    def claim_server_lease(
        self,
        server_id: str,
        nonce: str,
        *,
        ttl: timedelta,
        hostname: str,
        pid: int,
        pid_namespace: str,
        replacing: str | None = None,
    ) -> ServerLease:
        """Take the lease on ``server_id`` for the process ``nonce`` unless another
        process holds it and it has not expired (or it is the lease ``replacing``, whose
        holder is known to be gone). Returns the lease as it now stands: ours, or the
        other process's, unchanged."""
        now = self._clock.now()
        conflict = f"another server took the lease on server ID {server_id} at the same time"
        with self._writing(conflict=conflict) as session:
            row = session.get(ServerLeaseRow, server_id, with_for_update=True)
            if (row is not None and row.nonce not in (nonce, replacing)
                    and row.expires_at > now):
                return _server_lease_record(row)
            if row is None:
                row = ServerLeaseRow(server_id=server_id)
                session.add(row)
            row.nonce, row.hostname, row.pid = nonce, hostname, pid
            row.pid_namespace = pid_namespace
            row.started_at = row.renewed_at = now
            row.expires_at = now + ttl
            session.flush()
            return _server_lease_record(row)

    def renew_server_lease(self, server_id: str, nonce: str, *, ttl: timedelta) -> ServerLease:
        """Extend the lease ``nonce`` holds on ``server_id``. Returns the lease as it now
        stands: another process's, unchanged, when it has taken the ID over."""
        now = self._clock.now()
        with self._writing() as session:
            row = session.get(ServerLeaseRow, server_id, with_for_update=True)
            if row is None:
                raise FailedPrecondition(
                    f"the lease on server ID {server_id} is gone from the datastore"
                )
            if row.nonce == nonce:
                row.renewed_at = now
                row.expires_at = now + ttl
                session.flush()
            return _server_lease_record(row)

    def release_server_lease(self, server_id: str, nonce: str) -> None:
        """Give up the lease ``nonce`` holds on ``server_id`` (a clean stop), so the
        server may start again at once; a lease held by another process stays."""
        with self._writing() as session:
            session.execute(
                delete(ServerLeaseRow).where(
                    ServerLeaseRow.server_id == server_id, ServerLeaseRow.nonce == nonce
                )
            )

    def get_authority(self, authority_id: str) -> Authority:
        with self._reading() as session:
            return _authority_record(_authority_row(session, authority_id))

    def list_authorities(
        self,
        *,
        kind: str | None = None,
        server_id: str | None = None,
        include_revoked: bool = False,
    ) -> list[Authority]:
        """Journaled authorities, by kind then oldest first."""
        query = select(AuthorityRow)
        if kind is not None:
            _check_choice("authority kind", kind, AUTHORITY_KINDS)
            query = query.where(AuthorityRow.kind == kind)
        if server_id is not None:
            query = query.where(AuthorityRow.server_id == server_id)
        if not include_revoked:
            query = query.where(AuthorityRow.revoked.is_(False))
        query = query.order_by(
            AuthorityRow.kind, AuthorityRow.not_before, AuthorityRow.authority_id
        )
        with self._reading() as session:
            return [_authority_record(row) for row in session.scalars(query)]

    def set_authority_status(self, authority_id: str, status: str) -> Authority:
        _check_choice("authority status", status, AUTHORITY_STATUSES)
        return self._change_authority(authority_id, status=status)

    def set_authority_tainted(self, authority_id: str) -> Authority:
        return self._change_authority(authority_id, tainted=True)

    def set_authority_revoked(self, authority_id: str) -> Authority:
        return self._change_authority(authority_id, revoked=True)

    def _change_authority(self, authority_id: str, **changes: Any) -> Authority:
        with self._writing() as session:
            row = _authority_row(session, authority_id)
            for name, value in changes.items():
                setattr(row, name, value)
            session.flush()
            return _authority_record(row)

    def delete_authority(self, authority_id: str) -> None:
        with self._writing() as session:
            removed = session.connection().execute(
                delete(_table(AuthorityRow)).where(AuthorityRow.authority_id == authority_id)
            )
            if removed.rowcount == 0:
                raise _authority_not_found(authority_id)

    def bundle_sequence(self) -> int:
        """The trust bundle's ``spiffe_sequence`` (0 before the first bump)."""
        with self._reading() as session:
            return _counter(session, BUNDLE_SEQUENCE)

    def bump_bundle_sequence(self) -> int:
        """Increment the bundle sequence atomically; returns the new value."""
        with self._writing() as session:
            return _bump(session, BUNDLE_SEQUENCE)

    # -- federated bundles ------------------------------------------------------

    def set_federated_bundle(self, trust_domain: str, bundle: bytes) -> FederatedBundle:
        """Store (or replace) the SPIFFE bundle JSON of a federated trust domain."""
        now = self._clock.now()
        values = {"trust_domain": trust_domain, "bundle": bundle, "updated_at": now}
        changed = {"bundle": bundle, "updated_at": now}
        with self._writing() as session:
            session.connection().execute(
                _insert_on_conflict(
                    self.dialect,
                    FederatedBundleRow,
                    values,
                    keys=("trust_domain",),
                    changes=changed,
                )
            )
        return FederatedBundle(trust_domain, bundle, _stored_time(now))

    def get_federated_bundle(self, trust_domain: str) -> FederatedBundle:
        with self._reading() as session:
            row = session.get(FederatedBundleRow, trust_domain)
            if row is None:
                raise _bundle_not_found(trust_domain)
            return FederatedBundle(row.trust_domain, row.bundle, row.updated_at)

    def list_federated_bundles(self) -> list[FederatedBundle]:
        query = select(FederatedBundleRow).order_by(FederatedBundleRow.trust_domain)
        with self._reading() as session:
            return [
                FederatedBundle(row.trust_domain, row.bundle, row.updated_at)
                for row in session.scalars(query)
            ]

    def delete_federated_bundle(self, trust_domain: str) -> None:
        with self._writing() as session:
            removed = session.connection().execute(
                delete(_table(FederatedBundleRow)).where(
                    FederatedBundleRow.trust_domain == trust_domain
                )
            )
            if removed.rowcount == 0:
                raise _bundle_not_found(trust_domain)

    # -- federation relationships -------------------------------------------------

    def create_federation_relationship(
        self, relationship: NewFederationRelationship, *, bundle: bytes | None = None
    ) -> FederationRelationship:
        """Store a new relationship; with ``bundle`` (SPIFFE JSON) also store the
        federated trust domain's bundle, in the same transaction, and bump the bundle
        sequence. AlreadyExists if that trust domain has a relationship already."""
        _check_choice("bundle endpoint profile", relationship.profile, BUNDLE_ENDPOINT_PROFILES)
        now = self._clock.now()
        conflict = (
            f"a federation relationship with {relationship.trust_domain} exists already; "
            "change it with 'tessera server federation update' or delete it first"
        )
        with self._writing(conflict=conflict) as session:
            session.execute(
                insert(FederationRelationshipRow).values(
                    created_at=now,
                    updated_at=now,
                    last_refresh_at=None,
                    last_error=None,
                    **_relationship_columns(relationship),
                )
            )
            if bundle is not None:
                self._put_federated_bundle(session, relationship.trust_domain, bundle, now)
                _bump(session, BUNDLE_SEQUENCE)
            return _relationship_record(_relationship_row(session, relationship.trust_domain))

    def get_federation_relationship(self, trust_domain: str) -> FederationRelationship:
        with self._reading() as session:
            return _relationship_record(_relationship_row(session, trust_domain))

    def list_federation_relationships(self) -> list[FederationRelationship]:
        """Every relationship, by trust domain."""
        query = select(FederationRelationshipRow).order_by(FederationRelationshipRow.trust_domain)
        with self._reading() as session:
            return [_relationship_record(row) for row in session.scalars(query)]

    def update_federation_relationship(
        self, relationship: NewFederationRelationship, *, bundle: bytes | None = None
    ) -> FederationRelationship:
        """Replace the endpoint settings of the trust domain's relationship (its last
        refresh and error are cleared: they were about the old settings); ``bundle``
        as for :meth:`create_federation_relationship`. NotFound without one."""
        _check_choice("bundle endpoint profile", relationship.profile, BUNDLE_ENDPOINT_PROFILES)
        now = self._clock.now()
        with self._writing() as session:
            row = _relationship_row(session, relationship.trust_domain, lock=True)
            for name, value in _relationship_columns(relationship).items():
                setattr(row, name, value)
            row.updated_at = now
            row.last_refresh_at = None
            row.last_error = None
            if bundle is not None:
                self._put_federated_bundle(session, relationship.trust_domain, bundle, now)
                _bump(session, BUNDLE_SEQUENCE)
            session.flush()
            return _relationship_record(row)

    def delete_federation_relationship(self, trust_domain: str) -> FederationRelationship:
        """Delete the relationship and the trust domain's federated bundle with it
        (workloads stop trusting that trust domain); bumps the bundle sequence when a
        bundle went. Returns the deleted relationship; NotFound if there is none."""
        with self._writing() as session:
            record = _relationship_record(_relationship_row(session, trust_domain, lock=True))
            connection = session.connection()
            connection.execute(
                delete(_table(FederationRelationshipRow)).where(
                    FederationRelationshipRow.trust_domain == trust_domain
                )
            )
            removed = connection.execute(
                delete(_table(FederatedBundleRow)).where(
                    FederatedBundleRow.trust_domain == trust_domain
                )
            )
            if removed.rowcount:
                _bump(session, BUNDLE_SEQUENCE)
            return record

    def record_federation_refresh(
        self,
        trust_domain: str,
        *,
        error: str | None = None,
        bundle: bytes | None = None,
        bump_bundle_sequence: bool = False,
    ) -> FederationRelationship:
        """Note how fetching the trust domain's bundle endpoint went: now, and the
        error (None when it worked). With ``bundle`` the fetched bundle is stored in
        the same transaction; ``bump_bundle_sequence`` bumps the bundle sequence too,
        for a change agents must hear of. NotFound (and nothing stored) if the
        relationship was deleted meanwhile, so a late fetch cannot bring back the
        bundle of a trust domain no longer federated with."""
        now = self._clock.now()
        with self._writing() as session:
            row = _relationship_row(session, trust_domain, lock=True)
            row.last_refresh_at = now
            row.last_error = error
            if bundle is not None:
                self._put_federated_bundle(session, trust_domain, bundle, now)
            if bump_bundle_sequence:
                _bump(session, BUNDLE_SEQUENCE)
            session.flush()
            return _relationship_record(row)

    def _put_federated_bundle(
        self, session: Session, trust_domain: str, bundle: bytes, now: datetime
    ) -> None:
        session.connection().execute(
            _insert_on_conflict(
                self.dialect,
                FederatedBundleRow,
                {"trust_domain": trust_domain, "bundle": bundle, "updated_at": now},
                keys=("trust_domain",),
                changes={"bundle": bundle, "updated_at": now},
            )
        )

    # -- issued SVIDs -----------------------------------------------------------

    def record_issued_svids(
        self, svids: Sequence[IssuedSvid], *, audit: AuditNote | None = None
    ) -> None:
        """Record issued SVIDs in one batch (one executemany); AlreadyExists (and
        nothing recorded) if a serial repeats. ``audit``, the issuance's audit event,
        is chained to the audit log in the same transaction: the record of SVIDs
        expires with them, the audit log keeps every issuance.

        The rows go to the driver as they are, converted before the transaction
        opens: only ``expires_at`` needs converting, once per distinct value (a
        batch's SVIDs share a few expiry times, in whole seconds).
        """
        if not svids:
            return
        for kind in dict.fromkeys(svid.kind for svid in svids):
            _check_choice("SVID kind", kind, AUTHORITY_KINDS)
        statement = _issued_svids_insert(self._engines.writes.dialect)
        stored: dict[datetime, Any] = {}
        rows: list[tuple[Any, ...]] = []
        try:
            for svid in svids:
                expires_at = stored.get(svid.expires_at)
                if expires_at is None:
                    expires_at = stored[svid.expires_at] = statement.expires_at(svid.expires_at)
                rows.append(
                    (
                        svid.serial,
                        svid.spiffe_id,
                        svid.kind,
                        svid.agent_id,
                        svid.authority_id,
                        expires_at,
                    )
                )
        except (ValueError, TypeError) as error:
            raise InvalidArgument(f"the datastore refused a value: {error}") from error
        parameters: list[tuple[Any, ...]] | list[dict[str, Any]] = rows
        if not statement.positional:
            parameters = [dict(zip(_ISSUED_SVID_COLUMNS, row, strict=True)) for row in rows]
        conflict = (
            "an SVID with one of these serial numbers is recorded already; serials must be unique"
        )
        details = _audit_details(audit.details) if audit is not None else {}
        with self._writing(conflict=conflict) as session:
            session.connection().exec_driver_sql(statement.sql, parameters)
            if audit is not None:
                _append_audit(
                    session, self._clock.now(), audit.actor, audit.action, audit.target, details
                )

    def count_issued_svids(self) -> int:
        with self._reading() as session:
            return session.scalar(select(func.count()).select_from(IssuedSvidRow)) or 0

    def prune_issued_svids(self, expired_before: datetime) -> int:
        """Forget SVIDs that expired before ``expired_before``; returns how many."""
        with self._writing() as session:
            result = session.connection().execute(
                delete(_table(IssuedSvidRow)).where(IssuedSvidRow.expires_at < expired_before)
            )
            return result.rowcount

    # -- audit log --------------------------------------------------------------

    def append_audit(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Append an event to the audit log (append-only: nothing edits or deletes it)."""
        recorded = _audit_details(details or {})
        at = self._clock.now()
        with self._writing() as session:
            return _audit_record(_append_audit(session, at, actor, action, target, recorded))

    def verify_audit(self, *, batch: int = 1000) -> AuditVerification:
        """Walk the hash chain from the first event; name the first one that breaks it."""
        checked = 0
        previous: AuditEventRow | None = None
        expected_prev = GENESIS
        with self._reading() as session:
            head = session.get(AuditHeadRow, AUDIT_HEAD)
            after = 0
            while True:
                rows = list(
                    session.scalars(
                        select(AuditEventRow)
                        .where(AuditEventRow.id > after)
                        .order_by(AuditEventRow.id)
                        .limit(batch)
                    )
                )
                if not rows:
                    break
                for row in rows:
                    problem = _audit_problem(row, previous, expected_prev)
                    if problem is not None:
                        return AuditVerification(checked, problem[1], problem[0])
                    checked += 1
                    previous, expected_prev = row, row.hash
                after = rows[-1].id
            last_id = previous.id if previous is not None else 0
            if head is None or head.last_id != last_id or head.last_hash != expected_prev:
                newest = head.last_id if head is not None else "unknown"
                return AuditVerification(
                    checked,
                    f"the newest audit events were deleted: the log ends at event {last_id} "
                    f"but its head names event {newest}",
                    last_id or None,
                )
        return AuditVerification(checked)

    def list_audit(self, *, limit: int = 100) -> list[AuditEvent]:
        """The latest ``limit`` events, newest first."""
        if limit < 0:
            raise InvalidArgument("limit must not be negative")
        query = select(AuditEventRow).order_by(AuditEventRow.id.desc()).limit(limit)
        with self._reading() as session:
            return [_audit_record(row) for row in session.scalars(query)]


AUDIT_HEAD = "head"


# -- helpers: counters -----------------------------------------------------------


def _bump(session: Session, name: str) -> int:
    """Increment a counter in the caller's transaction; the row lock this takes
    on PostgreSQL makes concurrent writers queue until the first commits."""
    statement = (
        update(CounterRow)
        .where(CounterRow.name == name)
        .values(value=CounterRow.value + 1)
        .returning(CounterRow.value)
        .execution_options(synchronize_session=False)
    )
    return int(session.execute(statement).scalar_one())


def _join_token_not_found() -> NotFound:
    return NotFound(
        "join token not found or already used; generate a new one with "
        "'tessera server token generate'"
    )


def _join_token_expired(expires_at: datetime) -> FailedPrecondition:
    return FailedPrecondition(
        f"join token expired at {expires_at.isoformat()}; generate a new one "
        "with 'tessera server token generate'"
    )


def _redeem_join_token(session: Session, token: str, now: datetime) -> None:
    """Delete an unexpired join token in ``session``'s transaction; refuse it otherwise.

    The DELETE locks the row: of two attestations with one token, the second finds
    nothing once the first commits (or the token again, if the first rolled back)."""
    row = session.execute(
        delete(JoinTokenRow)
        .where(JoinTokenRow.token == token)
        .returning(JoinTokenRow.expires_at)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        raise _join_token_not_found()
    if row.expires_at <= now:
        raise _join_token_expired(row.expires_at)


def _append_audit(
    session: Session,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any],
) -> AuditEventRow:
    """Chain an event to the audit log in the caller's transaction. The head row's lock
    (PostgreSQL) queues concurrent writers, so the chain has no forks."""
    head = session.get(AuditHeadRow, AUDIT_HEAD, with_for_update=True)
    if head is None:
        raise FailedPrecondition("the audit log has no head row; run the migrations")
    row = AuditEventRow(
        at=at,
        actor=actor,
        action=action,
        target=target,
        details=details,
        prev_hash=head.last_hash,
        hash="",
    )
    session.add(row)
    session.flush()
    row.hash = event_digest(row.prev_hash, row.id, at, actor, action, target, details)
    head.last_id = row.id
    head.last_hash = row.hash
    return row


_SHARED_ROOT_FIELDS = tuple(f.name for f in dataclass_fields(SharedRoot))


_SERVER_LEASE_FIELDS = tuple(f.name for f in dataclass_fields(ServerLease))


def _server_lease_record(row: ServerLeaseRow) -> ServerLease:
    return ServerLease(**{f: getattr(row, f) for f in _SERVER_LEASE_FIELDS})


def _shared_root_record(row: SharedRootRow) -> SharedRoot:
    return SharedRoot(**{f: getattr(row, f) for f in _SHARED_ROOT_FIELDS})


def _audit_details(details: Mapping[str, Any]) -> dict[str, Any]:
    recorded = dict(details)
    try:
        json.dumps(recorded)
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"audit details must be plain JSON values: {error}") from error
    return recorded


def _audit_entry(
    session: Session, actor: str, action: str, entry_id: str, spiffe_id: str, at: datetime
) -> None:
    _append_audit(session, at, actor, action, entry_id, {"spiffe_id": spiffe_id})


def _counter(session: Session, name: str) -> int:
    return int(
        session.execute(select(CounterRow.value).where(CounterRow.name == name)).scalar_one()
    )


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _insert_on_conflict(
    dialect: str,
    model: type[Any],
    values: Mapping[str, Any],
    *,
    keys: Sequence[str],
    changes: Mapping[str, Any] | None = None,
) -> Insert:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET changes (or DO NOTHING):
    an upsert that is safe against a concurrent insert of the same key."""
    if dialect == "postgresql":
        pg_insert = postgresql.insert(_table(model)).values(dict(values))
        if changes is None:
            return pg_insert.on_conflict_do_nothing(index_elements=list(keys))
        return pg_insert.on_conflict_do_update(index_elements=list(keys), set_=dict(changes))
    lite_insert = sqlite.insert(_table(model)).values(dict(values))
    if changes is None:
        return lite_insert.on_conflict_do_nothing(index_elements=list(keys))
    return lite_insert.on_conflict_do_update(index_elements=list(keys), set_=dict(changes))


# -- helpers: entries ------------------------------------------------------------


def _normalise(selectors: Sequence[Selector]) -> tuple[Selector, ...]:
    return tuple(sorted(set(selectors)))


def _live_key(spiffe_id: str, parent_id: str, selectors: tuple[Selector, ...]) -> str:
    """What makes a live entry unique, hashed so the unique index stays small."""
    canonical = json.dumps(
        [spiffe_id, parent_id, [[s.type, s.value] for s in selectors]],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _live_entry(entry_id: str) -> ColumnElement[bool]:
    return and_(EntryRow.id == entry_id, EntryRow.deleted.is_(False))


def _entry_columns(entry: NewEntry) -> dict[str, Any]:
    return {
        "spiffe_id": entry.spiffe_id,
        "parent_id": entry.parent_id,
        "x509_svid_ttl": entry.x509_svid_ttl,
        "jwt_svid_ttl": entry.jwt_svid_ttl,
        "dns_names": list(entry.dns_names),
        "federates_with": list(entry.federates_with),
        "admin": entry.admin,
        "downstream": entry.downstream,
        "node": entry.node,
        "hint": entry.hint,
        "expires_at": entry.expires_at,
    }


def _insert_entry_selectors(
    session: Session, entry_id: str, selectors: tuple[Selector, ...]
) -> None:
    if selectors:
        session.execute(
            insert(EntrySelectorRow),
            [{"entry_id": entry_id, "type": s.type, "value": s.value} for s in selectors],
        )


def _refuse_duplicate_entry(session: Session, entry: NewEntry, key: str, entry_id: str) -> None:
    other = session.scalar(
        select(EntryRow.id).where(EntryRow.live_key == key, EntryRow.id != entry_id)
    )
    if other is not None:
        raise AlreadyExists(f"{_entry_conflict(entry)} (entry {other})")


def _entry_conflict(entry: NewEntry) -> str:
    return (
        f"an entry with SPIFFE ID {entry.spiffe_id}, parent ID {entry.parent_id} and the "
        "same selectors exists already; update that entry or use different selectors"
    )


def _entry_not_found(entry_id: str) -> NotFound:
    return NotFound(f"registration entry {entry_id} not found; list entries to see their IDs")


def _entry_record(row: EntryRow) -> RegistrationEntry:
    return RegistrationEntry(
        id=row.id,
        spiffe_id=row.spiffe_id,
        parent_id=row.parent_id,
        selectors=tuple(sorted(Selector(s.type, s.value) for s in row.selectors)),
        x509_svid_ttl=row.x509_svid_ttl,
        jwt_svid_ttl=row.jwt_svid_ttl,
        dns_names=tuple(row.dns_names),
        federates_with=tuple(row.federates_with),
        admin=row.admin,
        downstream=row.downstream,
        node=row.node,
        hint=row.hint,
        expires_at=row.expires_at,
        revision=row.revision,
        created_at=row.created_at,
        deleted=row.deleted,
    )


def _entry_record_from(
    entry_id: str,
    entry: NewEntry,
    selectors: tuple[Selector, ...],
    revision: int,
    created_at: datetime,
) -> RegistrationEntry:
    return RegistrationEntry(
        id=entry_id,
        spiffe_id=entry.spiffe_id,
        parent_id=entry.parent_id,
        selectors=selectors,
        x509_svid_ttl=entry.x509_svid_ttl,
        jwt_svid_ttl=entry.jwt_svid_ttl,
        dns_names=tuple(entry.dns_names),
        federates_with=tuple(entry.federates_with),
        admin=entry.admin,
        downstream=entry.downstream,
        node=entry.node,
        hint=entry.hint,
        expires_at=entry.expires_at,
        revision=revision,
        created_at=_stored_time(created_at),
    )


def _selector_filter(selectors: Sequence[Selector], match: str) -> ColumnElement[bool]:
    """Entries whose selector set relates to ``selectors`` as ``match`` says."""
    _check_choice("selector match", match, SELECTOR_MATCHES)
    wanted = _normalise(selectors)
    if not wanted:
        raise InvalidArgument("filtering by selectors needs at least one selector")

    def one_of(row: type[EntrySelectorRow]) -> ColumnElement[bool]:
        return or_(*(and_(row.type == s.type, row.value == s.value) for s in wanted))

    matched = aliased(EntrySelectorRow)
    sharing_any = select(matched.entry_id).where(one_of(matched))
    having_all = sharing_any.group_by(matched.entry_id).having(func.count() == len(wanted))
    extra = aliased(EntrySelectorRow)
    has_others = (
        select(extra.entry_id).where(extra.entry_id == EntryRow.id, not_(one_of(extra))).exists()
    )
    if match == "any":
        return EntryRow.id.in_(sharing_any)
    if match == "superset":
        return EntryRow.id.in_(having_all)
    if match == "subset":
        return and_(EntryRow.id.in_(sharing_any), not_(has_others))
    return and_(EntryRow.id.in_(having_all), not_(has_others))


# -- helpers: agents, authorities, bundles, audit -----------------------------------


def _agent_row(session: Session, spiffe_id: str) -> AgentRow:
    row = session.get(AgentRow, spiffe_id, populate_existing=True)
    if row is None:
        raise _agent_not_found(spiffe_id)
    return row


def _agent_not_found(spiffe_id: str) -> NotFound:
    return NotFound(f"agent {spiffe_id} not found; list agents to see the attested ones")


def _agent_record(row: AgentRow) -> AttestedAgent:
    return AttestedAgent(
        spiffe_id=row.spiffe_id,
        attestation_type=row.attestation_type,
        serial=row.serial,
        previous_serial=row.previous_serial,
        expires_at=_stored_time(row.expires_at),
        selectors=tuple(sorted(Selector(s.type, s.value) for s in row.selectors)),
        banned=row.banned,
        created_at=_stored_time(row.created_at),
        updated_at=_stored_time(row.updated_at),
    )


_AUTHORITY_FIELDS = (
    "authority_id",
    "kind",
    "server_id",
    "status",
    "tainted",
    "revoked",
    "key_id",
    "key_type",
    "not_before",
    "not_after",
    "certificate",
    "chain",
    "upstream_roots",
    "public_key",
    "created_at",
)


def _authority_row(session: Session, authority_id: str) -> AuthorityRow:
    row = session.get(AuthorityRow, authority_id)
    if row is None:
        raise _authority_not_found(authority_id)
    return row


def _authority_not_found(authority_id: str) -> NotFound:
    return NotFound(f"authority {authority_id} is not in the CA journal")


def _authority_record(row: AuthorityRow) -> Authority:
    values = {name: getattr(row, name) for name in _AUTHORITY_FIELDS}
    for name in ("not_before", "not_after", "created_at"):
        values[name] = _stored_time(values[name])
    return Authority(**values)


def _bundle_not_found(trust_domain: str) -> NotFound:
    return NotFound(f"no bundle is stored for trust domain {trust_domain}")


def _relationship_columns(relationship: NewFederationRelationship) -> dict[str, Any]:
    return {
        "trust_domain": relationship.trust_domain,
        "bundle_endpoint_url": relationship.bundle_endpoint_url,
        "profile": relationship.profile,
        "endpoint_spiffe_id": relationship.endpoint_spiffe_id,
    }


def _relationship_row(
    session: Session, trust_domain: str, *, lock: bool = False
) -> FederationRelationshipRow:
    row = session.get(
        FederationRelationshipRow, trust_domain, populate_existing=True, with_for_update=lock
    )
    if row is None:
        raise NotFound(
            f"no federation relationship with trust domain {trust_domain}; "
            "'tessera server federation list' shows the ones there are"
        )
    return row


def _relationship_record(row: FederationRelationshipRow) -> FederationRelationship:
    return FederationRelationship(
        trust_domain=row.trust_domain,
        bundle_endpoint_url=row.bundle_endpoint_url,
        profile=row.profile,
        endpoint_spiffe_id=row.endpoint_spiffe_id,
        created_at=_stored_time(row.created_at),
        updated_at=_stored_time(row.updated_at),
        last_refresh_at=_stored_time(row.last_refresh_at) if row.last_refresh_at else None,
        last_error=row.last_error,
    )


def _audit_record(row: AuditEventRow) -> AuditEvent:
    return AuditEvent(
        id=row.id,
        at=_stored_time(row.at),
        actor=row.actor,
        action=row.action,
        target=row.target,
        details=dict(row.details),
        hash=row.hash,
    )


def _audit_problem(
    row: AuditEventRow, previous: AuditEventRow | None, expected_prev: str
) -> tuple[int, str] | None:
    """(event id, what is wrong) for the first break in the chain at ``row``."""
    at = _stored_time(row.at)
    digest = event_digest(
        row.prev_hash, row.id, at, row.actor, row.action, row.target, dict(row.details)
    )
    if digest != row.hash:
        return row.id, (
            f"audit event {row.id} ({row.action} on {row.target!r} at {at.isoformat()}) was "
            "changed after it was written: its content no longer matches its hash"
        )
    if row.prev_hash != expected_prev:
        if previous is None:
            return row.id, f"the audit events before event {row.id} were deleted"
        return previous.id, (
            f"audit event {previous.id} ({previous.action} on {previous.target!r}) was "
            f"rewritten, or the events between it and event {row.id} were deleted: event "
            f"{row.id} was chained to a different predecessor"
        )
    return None


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidArgument(f"{what} {value!r} is not one of {', '.join(choices)}")


def _stored_time(value: datetime) -> datetime:
    """A time as the store gives it back: aware, in UTC (naive ones are refused)."""
    if value.tzinfo is None:
        raise InvalidArgument("naive datetime given to the datastore; pass a UTC-aware one")
    return value.astimezone(UTC)


# -- helpers: issued SVIDs -----------------------------------------------------------

_ISSUED_SVID_COLUMNS = ("serial", "spiffe_id", "kind", "agent_id", "authority_id", "expires_at")


@dataclass(frozen=True)
class _DriverInsert:
    """The INSERT of issued SVIDs in the driver's own terms, compiled once per dialect."""

    sql: str
    positional: bool
    """Rows are tuples in :data:`_ISSUED_SVID_COLUMNS` order; dicts by column otherwise."""
    expires_at: Callable[[Any], Any]
    """What SQLAlchemy does to an ``expires_at`` value before the driver sees it."""


_driver_inserts: dict[tuple[str, str, str], _DriverInsert] = {}


def _issued_svids_insert(dialect: Dialect) -> _DriverInsert:
    key = (dialect.name, dialect.driver, dialect.paramstyle)
    found = _driver_inserts.get(key)
    if found is not None:
        return found
    table = _table(IssuedSvidRow)
    compiled = insert(table).compile(dialect=dialect, column_keys=list(_ISSUED_SVID_COLUMNS))
    positions = compiled.positiontup
    # Only expires_at is converted (UtcDateTime): the text columns go as they are.
    plain = all(
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) is None
        for name in _ISSUED_SVID_COLUMNS[:-1]
    )
    if not plain or (positions is not None and tuple(positions) != _ISSUED_SVID_COLUMNS):
        raise AssertionError(f"unexpected INSERT for issued SVIDs on {dialect.name}")
    processor = table.c.expires_at.type.dialect_impl(dialect).bind_processor(dialect)
    made = _DriverInsert(
        sql=compiled.string,
        positional=positions is not None,
        expires_at=processor if processor is not None else _unchanged,
    )
    _driver_inserts[key] = made
    return made


def _unchanged(value: Any) -> Any:
    return value
