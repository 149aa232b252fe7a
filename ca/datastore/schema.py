"""The datastore's tables, as SQLAlchemy ORM models (SQLite and PostgreSQL alike).

These models describe the schema the newest migration produces; the
migrations in ``ca/datastore/migrations/versions`` are what create and change
it, and a test checks that the two agree. Change both together::

    alembic -c <an ini with script_location = ca/datastore/migrations> revision -m "..."

Times are stored in UTC and read back timezone-aware (:class:`UtcDateTime`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}

# Rows of the ``counters`` table, created by the first migration (``agents`` by 0005,
# the mesh's two by 0008).
ENTRY_REVISION = "entry_revision"
BUNDLE_SEQUENCE = "bundle_sequence"
TOMBSTONE_HORIZON = "tombstone_horizon"
AGENT_CHANGES = "agents"
"""Bumped by every change to an attested agent, so servers can cache agent records."""
MESH_REVISION = "mesh_revision"
"""Bumped by every change to the mesh configuration or its catalog of instances; its
row is also the lock that queues those changes (see ca/datastore/sql/mesh.py)."""
MESH_TOMBSTONE_HORIZON = "mesh_tombstone_horizon"
"""The highest mesh revision below which the tombstones of deleted resources and
instances are gone."""
COUNTERS = (
    ENTRY_REVISION,
    BUNDLE_SEQUENCE,
    TOMBSTONE_HORIZON,
    AGENT_CHANGES,
    MESH_REVISION,
    MESH_TOMBSTONE_HORIZON,
)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and returned timezone-aware in UTC.

    SQLite keeps no zone, PostgreSQL answers in the session's zone; both come
    back as UTC here. Naive datetimes are refused before they reach the store.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the datastore; pass a UTC-aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class CounterRow(Base):
    """Named counters bumped atomically: the entry revision, the bundle sequence."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class EntryRow(Base):
    __tablename__ = "registration_entries"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    spiffe_id: Mapped[str] = mapped_column(Text, index=True)
    parent_id: Mapped[str] = mapped_column(Text, index=True)
    # sha256 of (spiffe_id, parent_id, selector set) for live entries, NULL for
    # tombstones: the unique index keeps live entries distinct.
    live_key: Mapped[str | None] = mapped_column(Text, unique=True)
    x509_svid_ttl: Mapped[int] = mapped_column(Integer)
    jwt_svid_ttl: Mapped[int] = mapped_column(Integer)
    dns_names: Mapped[list[str]] = mapped_column(JSON)
    federates_with: Mapped[list[str]] = mapped_column(JSON)
    admin: Mapped[bool] = mapped_column(Boolean)
    downstream: Mapped[bool] = mapped_column(Boolean)
    node: Mapped[bool] = mapped_column(Boolean)
    hint: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    revision: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    deleted: Mapped[bool] = mapped_column(Boolean)

    # Read through these; written with plain statements (see store.py).
    selectors: Mapped[list[EntrySelectorRow]] = relationship(lazy="selectin", viewonly=True)


class EntrySelectorRow(Base):
    __tablename__ = "entry_selectors"
    __table_args__ = (Index("ix_entry_selectors_type_value", "type", "value"),)

    entry_id: Mapped[str] = mapped_column(
        Text, ForeignKey("registration_entries.id", ondelete="CASCADE"), primary_key=True
    )
    type: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text, primary_key=True)


class AgentRow(Base):
    __tablename__ = "attested_agents"

    spiffe_id: Mapped[str] = mapped_column(Text, primary_key=True)
    attestation_type: Mapped[str] = mapped_column(Text)
    serial: Mapped[str] = mapped_column(Text)
    # The serial before the last renewal, accepted until the new SVID is first used,
    # so an agent whose renewal answer was lost is not locked out.
    previous_serial: Mapped[str] = mapped_column(Text, server_default="")
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    banned: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)

    selectors: Mapped[list[AgentSelectorRow]] = relationship(lazy="selectin", viewonly=True)


class AgentSelectorRow(Base):
    __tablename__ = "agent_selectors"

    agent_id: Mapped[str] = mapped_column(
        Text, ForeignKey("attested_agents.spiffe_id", ondelete="CASCADE"), primary_key=True
    )
    type: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text, primary_key=True)


class AgentAliasRow(Base):
    """An extra parent ID an agent answers for (e.g. from its join token)."""

    __tablename__ = "agent_aliases"

    agent_id: Mapped[str] = mapped_column(
        Text, ForeignKey("attested_agents.spiffe_id", ondelete="CASCADE"), primary_key=True
    )
    alias_id: Mapped[str] = mapped_column(Text, primary_key=True, index=True)


class JoinTokenRow(Base):
    __tablename__ = "join_tokens"

    token: Mapped[str] = mapped_column(Text, primary_key=True)
    alias_id: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class AuthorityRow(Base):
    __tablename__ = "authorities"

    authority_id: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    server_id: Mapped[str] = mapped_column(Text, index=True)
    status: Mapped[str] = mapped_column(Text)
    tainted: Mapped[bool] = mapped_column(Boolean)
    revoked: Mapped[bool] = mapped_column(Boolean)
    key_id: Mapped[str] = mapped_column(Text)
    key_type: Mapped[str] = mapped_column(Text)
    not_before: Mapped[datetime] = mapped_column(UtcDateTime)
    not_after: Mapped[datetime] = mapped_column(UtcDateTime)
    certificate: Mapped[bytes | None] = mapped_column(LargeBinary)
    chain: Mapped[bytes] = mapped_column(LargeBinary)
    upstream_roots: Mapped[bytes] = mapped_column(LargeBinary)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SharedRootRow(Base):
    """A self-signed root of the trust domain that the ``shared_root`` upstream authority
    signs every server's X.509 authority with; its key PKCS#8-encrypted under the KEK
    the servers share. ``generation`` orders them and keeps two servers from making the
    same next root."""

    __tablename__ = "shared_roots"

    generation: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    certificate: Mapped[bytes] = mapped_column(LargeBinary)
    encrypted_key: Mapped[bytes] = mapped_column(LargeBinary)
    not_before: Mapped[datetime] = mapped_column(UtcDateTime)
    not_after: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ServerLeaseRow(Base):
    """Which process runs as a server ID: one row per ID, renewed by the running server's
    tick; a second process with the same ID and a fresh lease refuses to start."""

    __tablename__ = "server_leases"

    server_id: Mapped[str] = mapped_column(Text, primary_key=True)
    nonce: Mapped[str] = mapped_column(Text)
    hostname: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    pid_namespace: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    renewed_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class FederatedBundleRow(Base):
    __tablename__ = "federated_bundles"

    trust_domain: Mapped[str] = mapped_column(Text, primary_key=True)
    bundle: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class FederationRelationshipRow(Base):
    """A trust domain this one federates with, and how its bundle is fetched."""

    __tablename__ = "federation_relationships"

    trust_domain: Mapped[str] = mapped_column(Text, primary_key=True)
    bundle_endpoint_url: Mapped[str] = mapped_column(Text)
    profile: Mapped[str] = mapped_column(Text)
    endpoint_spiffe_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_refresh_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class IssuedSvidRow(Base):
    __tablename__ = "issued_svids"

    serial: Mapped[str] = mapped_column(Text, primary_key=True)
    spiffe_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    agent_id: Mapped[str | None] = mapped_column(Text)
    authority_id: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class MeshResourceRow(Base):
    """One resource of the mesh configuration (``tessera mesh apply``), by kind and name.

    ``document`` is the resource as JSON text, in the Istio shape it was applied in
    (:meth:`mesh.Resource.to_document`). A deleted resource's row stays as a tombstone
    (``deleted``, the revision of the delete) so an agent syncing since an older
    revision hears of it; applying the resource again revives the row.
    """

    __tablename__ = "mesh_resources"

    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    document: Mapped[str] = mapped_column(Text)
    revision: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    deleted: Mapped[bool] = mapped_column(Boolean)


class MeshInstanceRow(Base):
    """One instance of a mesh Service, as the agent of its node registered it.

    Keyed by the registering agent (``node``), the Service and the address callers
    reach: an agent reports its whole set and only ever replaces its own rows.
    ``expires_at`` is the lease: an agent renews it with every report, and the server
    drops the rows of an agent that stopped reporting once it passes. A dropped or
    deregistered instance stays as a tombstone (``deleted``, the revision of the
    change), as resources do, so an agent syncing since an older revision hears of it.
    """

    __tablename__ = "mesh_instances"

    node: Mapped[str] = mapped_column(Text, primary_key=True)
    service: Mapped[str] = mapped_column(Text, primary_key=True)
    address: Mapped[str] = mapped_column(Text, primary_key=True)
    spiffe_id: Mapped[str] = mapped_column(Text)
    labels: Mapped[str] = mapped_column(Text)  # JSON object
    health: Mapped[str] = mapped_column(Text)
    since: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    revision: Mapped[int] = mapped_column(BigInteger, index=True)
    deleted: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Why it is unhealthy, as its agent's health check said (None when it is not)."""


class AuditEventRow(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The hash chain (ca/datastore/audit.py): the previous event's hash and this one's.
    prev_hash: Mapped[str] = mapped_column(Text, server_default="")
    hash: Mapped[str] = mapped_column(Text, server_default="")


class AuditHeadRow(Base):
    """One row: the newest audit event and its hash, so a deleted tail shows."""

    __tablename__ = "audit_head"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(Text)
