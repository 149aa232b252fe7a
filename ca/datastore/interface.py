"""What the server asks of its datastore: one Protocol per kind of record, and
:class:`Datastore` combining them.

The contract suite (tests/unit/ca/test_datastore_contract.py) is written against
these Protocols and runs on every implementation; today that is
:class:`ca.datastore.sql.SqlDatastore` on SQLite (embedded) and PostgreSQL
(several servers on one database)::

    store: Datastore = open_datastore("sqlite:////var/lib/tessera/datastore.sqlite3")
    entry = store.create_entry(NewEntry(spiffe_id, parent_id, selectors=(selector,)))
    changed = store.entries_changed_since(agent_revision)   # live entries and tombstones
    store.close()

Each method is one transaction, so a store may be called from many threads; a
method that fails leaves nothing half-written. Records taken and returned are
frozen dataclasses (:mod:`ca.datastore.records`).

Every change to the entries, and to an agent's aliases, takes the next value of
one global *entry revision* counter in the same transaction, and revisions follow
commit order: a reader that has seen revision N has seen everything up to N.
Deleting an entry leaves a tombstone carrying its deletion revision, so
:meth:`EntryStore.entries_changed_since` tells of it; tombstones are purged once
they are old (:meth:`EntryStore.purge_tombstones`, run by the server's tick).

The *bundle sequence* counter says "the bundles agents receive changed": it is
bumped when this trust domain's authorities change, and when a federation
relationship's change adds, replaces or removes a federated bundle, so agents
long-polling on it wake up.

The *agents* counter is bumped by every change to an attested agent (attest,
renew, confirming a renewed SVID, ban, unban, evict), so a server caching agent
records hears of other servers' changes by reading it
(:meth:`Counters.sync_counters`). Changes made through a store are also told at
once, after their transaction ends, to the listeners added with
:meth:`Datastore.on_agent_change`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from attestor.selector import Selector
from ca.datastore.records import (
    AttestedAgent,
    AuditEvent,
    AuditNote,
    AuditVerification,
    Authority,
    FederatedBundle,
    FederationRelationship,
    InstanceKey,
    IssuedSvid,
    JoinToken,
    MeshApplyResult,
    MeshChanges,
    MeshResource,
    NewEntry,
    NewFederationRelationship,
    RegistrationEntry,
    ReportedInstance,
    ServerLease,
    SharedRoot,
)
from mesh import Config, Resource
from mesh.catalog import Catalog
from sdk.errors import FailedPrecondition

AgentChangeListener = Callable[[str, int | None], None]
"""Called with an agent's SPIFFE ID after a transaction that changed it (or tried to)
ended, and the agents counter's value that change took: None when the transaction
may not have committed."""


@runtime_checkable
class Counters(Protocol):
    """The counters other servers and agents follow to hear of changes."""

    def current_revision(self) -> int:
        """The global entry revision: 0 for a new store, then one more per change."""
        ...

    def agent_changes(self) -> int:
        """The agents counter: 0 for a new store, then one more per agent change."""
        ...

    def sync_counters(self) -> tuple[int, int, int, int]:
        """(entry revision, bundle sequence, agents counter, mesh revision), read
        together."""
        ...

    def bundle_sequence(self) -> int:
        """The trust bundle's ``spiffe_sequence`` (0 before the first bump)."""
        ...

    def bump_bundle_sequence(self) -> int:
        """Increment the bundle sequence atomically; returns the new value."""
        ...


@runtime_checkable
class EntryStore(Protocol):
    """Registration entries, and the tombstones deleted ones leave."""

    def create_entry(
        self, entry: NewEntry, *, audited_by: str | None = None
    ) -> RegistrationEntry: ...

    def get_entry(self, entry_id: str) -> RegistrationEntry: ...

    def update_entry(
        self, entry_id: str, entry: NewEntry, *, audited_by: str | None = None
    ) -> RegistrationEntry: ...

    def delete_entry(
        self, entry_id: str, *, audited_by: str | None = None
    ) -> RegistrationEntry: ...

    def list_entries(
        self,
        *,
        spiffe_id: str | None = None,
        parent_id: str | None = None,
        selectors: Sequence[Selector] | None = None,
        selector_match: str = "superset",
        limit: int | None = None,
        offset: int = 0,
    ) -> list[RegistrationEntry]: ...

    def search_entries(
        self,
        *,
        text: str | None = None,
        parent_id: str | None = None,
        selectors: Sequence[Selector] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[RegistrationEntry], int]: ...

    def count_entries(self) -> int: ...

    def entries_by_parent(self, parent_ids: Collection[str]) -> list[RegistrationEntry]: ...

    def entries_changed_since(self, revision: int) -> list[RegistrationEntry]: ...

    def purge_tombstones(self, before_revision: int) -> int: ...

    def purged_revision(self) -> int: ...


@runtime_checkable
class AgentStore(Protocol):
    """Attested agents, their selectors and aliases."""

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
    ) -> AttestedAgent: ...

    def get_agent(self, spiffe_id: str) -> AttestedAgent: ...

    def list_agents(self) -> list[AttestedAgent]: ...

    def count_agents(self) -> int: ...

    def update_agent_serial(
        self, spiffe_id: str, serial: str, expires_at: datetime
    ) -> AttestedAgent: ...

    def confirm_agent_serial(self, spiffe_id: str) -> None: ...

    def set_agent_banned(self, spiffe_id: str, banned: bool) -> AttestedAgent: ...

    def delete_agent(self, spiffe_id: str) -> None: ...

    def add_agent_alias(self, agent_id: str, alias_id: str) -> None: ...

    def agent_aliases(self, agent_id: str) -> set[str]: ...


@runtime_checkable
class JoinTokenStore(Protocol):
    """Join tokens: single use, until they expire."""

    def create_join_token(
        self, token: str, *, alias_id: str | None, expires_at: datetime
    ) -> JoinToken: ...

    def find_join_token(self, token: str) -> JoinToken: ...

    def consume_join_token(self, token: str) -> JoinToken: ...

    def list_join_tokens(self) -> list[JoinToken]: ...

    def prune_join_tokens(self) -> int: ...


@runtime_checkable
class AuthorityStore(Protocol):
    """The CA journal: this trust domain's X.509 and JWT authorities."""

    def add_authority(self, authority: Authority) -> Authority: ...

    def get_authority(self, authority_id: str) -> Authority: ...

    def list_authorities(
        self,
        *,
        kind: str | None = None,
        server_id: str | None = None,
        include_revoked: bool = False,
    ) -> list[Authority]: ...

    def set_authority_status(self, authority_id: str, status: str) -> Authority: ...

    def set_authority_tainted(self, authority_id: str) -> Authority: ...

    def set_authority_revoked(self, authority_id: str) -> Authority: ...

    def delete_authority(self, authority_id: str) -> None: ...


@runtime_checkable
class SharedRootStore(Protocol):
    """The roots of the shared-root upstream authority, by generation."""

    def add_shared_root(self, root: SharedRoot) -> SharedRoot: ...

    def list_shared_roots(self) -> list[SharedRoot]: ...


@runtime_checkable
class ServerLeaseStore(Protocol):
    """Leases that keep one running process per server ID."""

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
    ) -> ServerLease: ...

    def renew_server_lease(
        self, server_id: str, nonce: str, *, ttl: timedelta
    ) -> ServerLease: ...

    def release_server_lease(self, server_id: str, nonce: str) -> None: ...


@runtime_checkable
class FederatedBundleStore(Protocol):
    """The bundles of the trust domains this one federates with."""

    def set_federated_bundle(self, trust_domain: str, bundle: bytes) -> FederatedBundle: ...

    def get_federated_bundle(self, trust_domain: str) -> FederatedBundle: ...

    def list_federated_bundles(self) -> list[FederatedBundle]: ...

    def delete_federated_bundle(self, trust_domain: str) -> None: ...


@runtime_checkable
class FederationRelationshipStore(Protocol):
    """Federation relationships: where each federated bundle is fetched from."""

    def create_federation_relationship(
        self, relationship: NewFederationRelationship, *, bundle: bytes | None = None
    ) -> FederationRelationship: ...

    def get_federation_relationship(self, trust_domain: str) -> FederationRelationship: ...

    def list_federation_relationships(self) -> list[FederationRelationship]: ...

    def update_federation_relationship(
        self, relationship: NewFederationRelationship, *, bundle: bytes | None = None
    ) -> FederationRelationship: ...

    def delete_federation_relationship(self, trust_domain: str) -> FederationRelationship: ...

    def record_federation_refresh(
        self,
        trust_domain: str,
        *,
        error: str | None = None,
        bundle: bytes | None = None,
        bump_bundle_sequence: bool = False,
    ) -> FederationRelationship: ...


class RevisionMoved(FailedPrecondition):
    """A write made on the condition that the entry revision was still the one its
    caller read found another (``revision``); nothing was written."""

    def __init__(self, expected: int, revision: int) -> None:
        super().__init__(f"the entry revision is {revision}, no longer {expected}")
        self.expected = expected
        self.revision = revision


@runtime_checkable
class IssuedSvidStore(Protocol):
    """The record of issued SVIDs, kept until a while after they expire."""

    def record_issued_svids(
        self,
        svids: Sequence[IssuedSvid],
        *,
        audit: AuditNote | Sequence[AuditNote] | None = None,
        revision: int | None = None,
    ) -> None: ...

    def count_issued_svids(self) -> int: ...

    def list_issued_svids(
        self,
        *,
        valid_at: datetime,
        expiring_before: datetime | None = None,
        spiffe_id: str | None = None,
        agent_id: str | None = None,
        limit: int = 200,
    ) -> tuple[list[IssuedSvid], int]: ...

    def prune_issued_svids(self, expired_before: datetime) -> int: ...


@runtime_checkable
class MeshConfigStore(Protocol):
    """The mesh configuration (``tessera mesh apply``): its resources by kind and name,
    the tombstones deleted ones leave, and its revision.

    :meth:`apply_mesh` and :meth:`delete_mesh_resource` are all-or-nothing: each loads
    the stored configuration, changes it with :meth:`mesh.Config.apply` or
    :meth:`~mesh.Config.delete` (which refuse, with ``mesh.ConfigError``, anything that
    would leave a reference to something missing), and writes the changed resources,
    the next mesh revision and one audit event in one transaction. Applies and deletes
    are serialized, also across servers sharing the database, so two of them cannot
    each keep a reference the other removes.
    """

    def apply_mesh(
        self,
        resources: Sequence[Resource],
        *,
        dry_run: bool = False,
        audited_by: str | None = None,
    ) -> MeshApplyResult:
        """Create or replace ``resources``; ``mesh.ConfigError`` (nothing stored) if the
        input names one twice or the result refers to something missing. With
        ``dry_run`` nothing is written; with ``audited_by``, a change writes the
        ``mesh.apply`` audit event by that actor."""
        ...

    def delete_mesh_resource(
        self, kind: str, name: str, *, audited_by: str | None = None
    ) -> MeshResource:
        """Delete a resource, leaving its tombstone (returned); NotFound when it does not
        exist, ``mesh.ConfigError`` naming the referrers while something refers to it.
        ``audited_by`` as for :meth:`apply_mesh` (event ``mesh.delete``)."""
        ...

    def get_mesh_resource(self, kind: str, name: str) -> MeshResource: ...

    def list_mesh_resources(self, kind: str | None = None) -> list[MeshResource]:
        """Live resources (of one kind), in Tessera's order: by kind, then name."""
        ...

    def mesh_config(self) -> tuple[Config, int]:
        """The stored configuration, typed, and the mesh revision it is at."""
        ...

    def mesh_revision(self) -> int:
        """The mesh revision: 0 for a new store, then one more per change."""
        ...

    def mesh_changed_since(self, revision: int) -> MeshChanges:
        """What changed after mesh revision ``revision``: the resources and tombstones
        whose revision is above it, in revision order, and the current revision, read
        together. When ``revision`` is 0, below :meth:`mesh_purged_revision` (deletions
        may have been forgotten) or above the current revision (another database), the
        answer is ``full``: every live resource, to replace what the caller has."""
        ...

    def purge_mesh_tombstones(self, before_revision: int) -> int:
        """Forget the tombstones older than ``before_revision``; returns how many."""
        ...

    def mesh_purged_revision(self) -> int:
        """The highest ``before_revision`` purged so far: a client last synced below it
        may have missed deletions and must take the whole configuration again."""
        ...


@runtime_checkable
class MeshCatalogStore(Protocol):
    """The mesh's catalog: the instances each agent registered, with health and lease.

    Catalog changes take the next mesh revision (the configuration's counter), so
    :meth:`MeshConfigStore.mesh_changed_since` carries both.
    """

    def report_mesh_instances(
        self, node: str, instances: Sequence[ReportedInstance], *, lease: timedelta
    ) -> int:
        """Make ``instances`` the whole set agent ``node`` registered (adding, changing
        and removing rows), renew their lease to now + ``lease``; the mesh revision after."""
        ...

    def expire_mesh_instances(self) -> list[InstanceKey]:
        """Drop the instances whose lease has passed; returns them."""
        ...

    def mesh_catalog(self) -> Catalog:
        """Every live instance."""
        ...


@runtime_checkable
class AuditLog(Protocol):
    """The audit log: append-only, hash-chained."""

    def append_audit(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEvent: ...

    def verify_audit(self, *, batch: int = 1000) -> AuditVerification: ...

    def list_audit(self, *, limit: int = 100) -> list[AuditEvent]: ...


@runtime_checkable
class Datastore(
    Counters,
    EntryStore,
    AgentStore,
    JoinTokenStore,
    AuthorityStore,
    SharedRootStore,
    ServerLeaseStore,
    FederatedBundleStore,
    FederationRelationshipStore,
    IssuedSvidStore,
    MeshConfigStore,
    MeshCatalogStore,
    AuditLog,
    Protocol,
):
    """The server's persistent state: every kind of record, and the store's lifecycle."""

    @property
    def dialect(self) -> str:
        """The database's kind (``sqlite`` or ``postgresql`` for the SQL store)."""
        ...

    def close(self) -> None:
        """Let the database go; later calls raise Unavailable."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """:meth:`close`."""
        ...

    def ping(self) -> None:
        """Return when the database answers; Unavailable otherwise."""
        ...

    def on_agent_change(self, listener: AgentChangeListener) -> None:
        """Call ``listener`` after every agent change made through this store, in the
        thread that made it; it must be quick and must not raise."""
        ...


PROTOCOLS: tuple[type[Any], ...] = (
    Counters,
    EntryStore,
    AgentStore,
    JoinTokenStore,
    AuthorityStore,
    SharedRootStore,
    ServerLeaseStore,
    FederatedBundleStore,
    FederationRelationshipStore,
    IssuedSvidStore,
    MeshConfigStore,
    MeshCatalogStore,
    AuditLog,
    Datastore,
)
"""Every Protocol here, for the contract suite's conformance check."""


def protocol_members(protocol: type[Any]) -> set[str]:
    """The methods and properties ``protocol`` asks for, its bases' included."""
    members: set[str] = set()
    for cls in protocol.__mro__:
        if not getattr(cls, "_is_protocol", False) or cls is Protocol:
            continue
        for name, value in vars(cls).items():
            wanted = not name.startswith("_") or name in ("__enter__", "__exit__")
            if wanted and (callable(value) or isinstance(value, property)):
                members.add(name)
    return members
