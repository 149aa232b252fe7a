"""The mesh configuration: its resources, their tombstones, and its revision.

An apply or a delete is one transaction: it locks the mesh revision's counter row
(``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's write transactions begin with
``BEGIN IMMEDIATE`` and so already queue), loads the stored configuration, changes it
with :class:`mesh.Config` (which checks every reference over the result), writes the
changed rows, takes the next mesh revision and appends one audit event. The lock is
taken before the configuration is read, so two servers applying at once see each
other's change: neither can keep a reference to what the other removes.

The typed configuration of the last revision read or written is kept (it is
immutable, and a revision names exactly one configuration), so an apply parses only
its own input, not every stored resource again.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ca.datastore.records import InstanceKey, MeshApplyResult, MeshChanges, MeshResource
from ca.datastore.schema import (
    MESH_REVISION,
    MESH_TOMBSTONE_HORIZON,
    CounterRow,
    MeshInstanceRow,
    MeshResourceRow,
)
from ca.datastore.sql.audit import _append_audit
from ca.datastore.sql.base import (
    SqlBase,
    _bump,
    _counter,
    _insert_on_conflict,
    _stored_time,
    _table,
)
from mesh import KINDS, Change, Config, ConfigError, Resource, ResourceKey, parse_resource
from mesh.catalog import Health, Instance
from sdk.address import HostPort
from sdk.errors import FailedPrecondition, InvalidArgument, NotFound

__all__ = ["MeshMixin", "instance_from_row"]

_KIND_ORDER = {kind: position for position, kind in enumerate(KINDS)}


class MeshMixin(SqlBase):
    """:class:`~ca.datastore.interface.MeshConfigStore` on SQL."""

    # (mesh revision, the configuration at it); replaced whole, so read without a lock.
    _mesh_cached: tuple[int, Config] | None = None

    def apply_mesh(
        self,
        resources: Sequence[Resource],
        *,
        dry_run: bool = False,
        audited_by: str | None = None,
    ) -> MeshApplyResult:
        """Create or replace ``resources`` in one transaction; ``mesh.ConfigError`` with
        every problem, and nothing stored, when the result would not hold together."""
        incoming = list(resources)
        replacing = {resource.key for resource in incoming}
        if dry_run:
            with self._reading() as session:
                revision = _counter(session, MESH_REVISION)
                stored = self._stored_config(session, revision, replacing)
                _, changes = stored.apply(incoming)
            return MeshApplyResult(revision, tuple(changes), dry_run=True)
        now = self._clock.now()
        with self._writing() as session:
            revision = _lock_mesh_revision(session)
            stored = self._stored_config(session, revision, replacing)
            config, changes = stored.apply(incoming)
            changed = [change for change in changes if change.action != "unchanged"]
            if changed:
                revision = _bump(session, MESH_REVISION)
                by_key = {resource.key: resource for resource in incoming}
                for change in changed:
                    resource = by_key[ResourceKey(change.kind, change.name)]
                    row = _row_values(resource, revision, now)
                    if change.action == "created":  # over a tombstone, if there is one
                        session.execute(_insert_on_conflict(
                            self.dialect, MeshResourceRow, row, keys=("kind", "name"),
                            changes={k: v for k, v in row.items() if k not in ("kind", "name")},
                        ))
                    else:
                        session.execute(
                            update(MeshResourceRow)
                            .where(_key_is(change.kind, change.name))
                            .values(document=row["document"], revision=revision, updated_at=now)
                            .execution_options(synchronize_session=False)
                        )
                if audited_by is not None:
                    _append_audit(
                        session, now, audited_by, "mesh.apply", _apply_target(changed),
                        {"revision": revision, "changes": [_change_json(c) for c in changed]},
                    )
        if changed:
            self._mesh_cached = (revision, config)
        return MeshApplyResult(revision, tuple(changes))

    def delete_mesh_resource(
        self, kind: str, name: str, *, audited_by: str | None = None
    ) -> MeshResource:
        """Delete a resource, leaving its tombstone (returned); NotFound when there is
        none, ``mesh.ConfigError`` naming each resource that still refers to it."""
        model = _kind(kind)
        key = ResourceKey(model.KIND, name)
        now = self._clock.now()
        with self._writing() as session:
            revision = _lock_mesh_revision(session)
            row = session.scalar(select(MeshResourceRow).where(_live(model.KIND, name)))
            if row is None:
                raise _not_found(model.KIND, name)
            stored = self._stored_config(session, revision, {key})
            # A resource this Tessera cannot read was left out of ``stored``: it goes.
            config = stored.delete(model, name) if key in stored else stored
            revision = _bump(session, MESH_REVISION)
            record = _record(row)
            session.execute(
                update(MeshResourceRow)
                .where(_key_is(model.KIND, name))
                .values(deleted=True, revision=revision, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if audited_by is not None:
                _append_audit(
                    session, now, audited_by, "mesh.delete", str(key), {"revision": revision}
                )
        self._mesh_cached = (revision, config)
        return MeshResource(
            kind=record.kind,
            name=record.name,
            document=record.document,
            revision=revision,
            created_at=record.created_at,
            updated_at=_stored_time(now),
            deleted=True,
        )

    def get_mesh_resource(self, kind: str, name: str) -> MeshResource:
        model = _kind(kind)
        with self._reading() as session:
            row = session.scalar(select(MeshResourceRow).where(_live(model.KIND, name)))
            if row is None:
                raise _not_found(model.KIND, name)
            return _record(row)

    def list_mesh_resources(self, kind: str | None = None) -> list[MeshResource]:
        """Live resources (of one kind), by kind in Tessera's order, then name."""
        query = select(MeshResourceRow).where(MeshResourceRow.deleted.is_(False))
        if kind is not None:
            query = query.where(MeshResourceRow.kind == _kind(kind).KIND)
        with self._reading() as session:
            records = [_record(row) for row in session.scalars(query)]
        return sorted(records, key=lambda r: (_KIND_ORDER.get(r.kind, len(KINDS)), r.name))

    def mesh_config(self) -> tuple[Config, int]:
        """The stored configuration, typed, and the mesh revision it is at."""
        with self._reading() as session:
            revision = _counter(session, MESH_REVISION)
            return self._stored_config(session, revision, frozenset()), revision

    def mesh_revision(self) -> int:
        with self._reading() as session:
            return _counter(session, MESH_REVISION)

    def mesh_changed_since(self, revision: int) -> MeshChanges:
        with self._reading() as session:
            current = _counter(session, MESH_REVISION)
            purged = _counter(session, MESH_TOMBSTONE_HORIZON)
            full = revision <= 0 or revision < purged or revision > current
            query = select(MeshResourceRow).order_by(
                MeshResourceRow.revision, MeshResourceRow.kind, MeshResourceRow.name
            )
            if full:
                query = query.where(MeshResourceRow.deleted.is_(False))
            else:
                query = query.where(MeshResourceRow.revision > revision)
            resources = tuple(_record(row) for row in session.scalars(query))
            instances = select(MeshInstanceRow).order_by(
                MeshInstanceRow.revision, MeshInstanceRow.service, MeshInstanceRow.address
            )
            if full:
                instances = instances.where(MeshInstanceRow.deleted.is_(False))
            else:
                instances = instances.where(MeshInstanceRow.revision > revision)
            rows = list(session.scalars(instances))
        return MeshChanges(
            current,
            resources,
            full=full,
            instances=tuple(instance_from_row(row) for row in rows if not row.deleted),
            removed_instances=tuple(
                InstanceKey(row.node, row.service, row.address) for row in rows if row.deleted
            ),
        )

    def purge_mesh_tombstones(self, before_revision: int) -> int:
        """Forget the tombstones (of resources and instances) older than
        ``before_revision``; returns how many."""
        with self._writing() as session:
            removed = 0
            for table in (MeshResourceRow, MeshInstanceRow):
                removed += session.connection().execute(
                    delete(_table(table)).where(
                        table.deleted.is_(True), table.revision < before_revision
                    )
                ).rowcount
            session.execute(
                update(CounterRow)
                .where(
                    CounterRow.name == MESH_TOMBSTONE_HORIZON, CounterRow.value < before_revision
                )
                .values(value=before_revision)
                .execution_options(synchronize_session=False)
            )
            return removed

    def mesh_purged_revision(self) -> int:
        with self._reading() as session:
            return _counter(session, MESH_TOMBSTONE_HORIZON)

    # -- the stored configuration -------------------------------------------------------

    def _stored_config(
        self, session: Session, revision: int, replacing: Collection[ResourceKey]
    ) -> Config:
        """The configuration stored at ``revision``, read in ``session``.

        A stored document this Tessera cannot read (written by a newer one, or valid
        under an older rule) is left out when the caller replaces or deletes it, and
        refused otherwise: a configuration missing it could not be checked.
        """
        cached = self._mesh_cached
        if cached is not None and cached[0] == revision:
            return cached[1]
        query = select(
            MeshResourceRow.kind, MeshResourceRow.name, MeshResourceRow.document
        ).where(MeshResourceRow.deleted.is_(False))
        resources: list[Resource] = []
        unreadable: list[str] = []
        skipped = False
        for kind, name, document in session.execute(query):
            try:
                resources.append(parse_resource(json.loads(document), source=f"{kind} {name}"))
            except (ConfigError, ValueError) as err:
                if ResourceKey(kind, name) in replacing:
                    skipped = True
                    continue
                reason = str(err).splitlines()[0]
                unreadable.append(f"{kind} {name} ({reason})")
        if unreadable:
            raise FailedPrecondition(
                "the stored mesh configuration holds resources this Tessera cannot read: "
                f"{'; '.join(unreadable)}; apply a corrected version of each, or delete it"
            )
        config = Config(resources)
        if not skipped:
            self._mesh_cached = (revision, config)
        return config


def _lock_mesh_revision(session: Session) -> int:
    """The mesh revision, its row locked until the transaction ends (PostgreSQL): every
    other apply or delete waits here, before it reads the configuration."""
    query = select(CounterRow.value).where(CounterRow.name == MESH_REVISION).with_for_update()
    return int(session.execute(query).scalar_one())


def _kind(kind: str) -> type[Resource]:
    model = KINDS.get(kind)
    if model is None:
        raise InvalidArgument(f"{kind!r} is not a mesh kind; one of {', '.join(KINDS)}")
    return model


def _key_is(kind: str, name: str) -> Any:
    return (MeshResourceRow.kind == kind) & (MeshResourceRow.name == name)


def _live(kind: str, name: str) -> Any:
    return _key_is(kind, name) & MeshResourceRow.deleted.is_(False)


def _not_found(kind: str, name: str) -> NotFound:
    return NotFound(
        f"{kind} {name} does not exist; 'tessera mesh get {kind.lower()}' lists the "
        f"{kind}s there are"
    )


def _row_values(resource: Resource, revision: int, now: Any) -> dict[str, Any]:
    return {
        "kind": resource.KIND,
        "name": resource.name,
        "document": json.dumps(resource.to_document(), separators=(",", ":")),
        "revision": revision,
        "created_at": now,
        "updated_at": now,
        "deleted": False,
    }


def _apply_target(changed: Sequence[Change]) -> str:
    """The audit event's target: the resource, or how many when several changed."""
    if len(changed) == 1:
        return f"{changed[0].kind} {changed[0].name}"
    return f"{len(changed)} resources"


def _change_json(change: Change) -> dict[str, str]:
    return {"kind": change.kind, "name": change.name, "action": change.action}


def _record(row: MeshResourceRow) -> MeshResource:
    return MeshResource(
        kind=row.kind,
        name=row.name,
        document=json.loads(row.document),
        revision=row.revision,
        created_at=_stored_time(row.created_at),
        updated_at=_stored_time(row.updated_at),
        deleted=row.deleted,
    )


def instance_from_row(row: MeshInstanceRow) -> Instance:
    return Instance(
        service=row.service,
        address=HostPort.parse(row.address),
        node=row.node,
        labels=json.loads(row.labels),
        health=_health(row.health),
        since=_stored_time(row.since),
        spiffe_id=row.spiffe_id,
        detail=row.detail,
    )


def _health(text: str) -> Health:
    if text == "healthy":
        return "healthy"
    return "unhealthy" if text == "unhealthy" else "unknown"
