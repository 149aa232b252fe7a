"""The mesh's catalog: the instances agents registered, their health, and their leases.

An agent reports the whole set of instances on its node (:meth:`report_mesh_instances`);
the server keeps that set for it, row by row, and renews the lease of every row with each
report. What changed (an instance new, gone, relabelled, or of another health) takes
the next mesh revision, the same counter as the configuration's, so one long poll wakes
an agent for both; a report that changes nothing only renews the lease and wakes nobody.
Rows of an agent that stopped reporting go when their lease passes
(:meth:`expire_mesh_instances`, run by the server's maintenance loop).

An unhealthy instance's ``detail`` (why its check failed) is for people, not proxies: a
report that changes only the detail writes it and takes no revision, so agents are not
woken to recompile views it has no part in (they hear of the new detail with the
instance's next change, or a full sync).

Registrations and departures are audit events (``mesh.instance.register``,
``mesh.instance.deregister``, ``mesh.instance.expire``); health changes are not: they
are the catalog's weather, visible in ``tessera mesh services``, and a flapping check
must not fill the audit chain.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from ca.datastore.records import InstanceKey, ReportedInstance
from ca.datastore.schema import MESH_REVISION, MeshInstanceRow
from ca.datastore.sql.audit import _append_audit_events
from ca.datastore.sql.base import SqlBase, _bump, _insert_on_conflict
from ca.datastore.sql.mesh import _lock_mesh_revision, instance_from_row
from mesh.catalog import Catalog

__all__ = ["MeshCatalogMixin"]


class MeshCatalogMixin(SqlBase):
    """:class:`~ca.datastore.interface.MeshCatalogStore` on SQL."""

    # Kept by MeshMixin: (mesh revision, configuration). A catalog change moves the
    # revision without changing the configuration, so the cache moves along with it.
    _mesh_cached: Any = None

    def report_mesh_instances(
        self, node: str, instances: Sequence[ReportedInstance], *, lease: timedelta
    ) -> int:
        """Make ``instances`` the whole set registered by agent ``node``, renew their
        lease to now + ``lease``, and return the mesh revision after the change."""
        now = self._clock.now()
        wanted = {(i.service, str(i.address)): i for i in instances}
        with self._writing() as session:
            revision = _lock_mesh_revision(session)
            stored = {
                (row.service, row.address): row
                for row in session.execute(
                    select(
                        MeshInstanceRow.service, MeshInstanceRow.address,
                        MeshInstanceRow.spiffe_id, MeshInstanceRow.labels,
                        MeshInstanceRow.health, MeshInstanceRow.since, MeshInstanceRow.deleted,
                        MeshInstanceRow.detail,
                    ).where(MeshInstanceRow.node == node)
                )
            }  # fmt: skip
            upserts: list[dict[str, Any]] = []
            details: list[tuple[tuple[str, str], str | None]] = []  # detail-only changes
            events: list[tuple[str, str, str, dict[str, Any]]] = []
            for key, reported in wanted.items():
                labels = json.dumps(dict(sorted(reported.labels.items())), separators=(",", ":"))
                row = stored.get(key)
                live = row if row is not None and not row.deleted else None
                if live is not None and (live.spiffe_id, live.labels, live.health) == (
                    reported.spiffe_id, labels, reported.health,
                ):  # fmt: skip
                    if live.detail != reported.detail:
                        details.append((key, reported.detail))
                    continue
                since = live.since if live is not None and live.health == reported.health else now
                upserts.append({
                    "node": node, "service": reported.service, "address": key[1],
                    "spiffe_id": reported.spiffe_id, "labels": labels,
                    "health": reported.health, "since": since, "deleted": False,
                    "detail": reported.detail,
                })  # fmt: skip
                if live is None:
                    events.append(_event(node, "mesh.instance.register", key, reported))
            removed = [
                key for key, row in stored.items() if not row.deleted and key not in wanted
            ]
            events.extend(
                (node, "mesh.instance.deregister", f"{service} {address}", {"node": node})
                for service, address in removed
            )
            expires = now + lease
            before = revision
            if upserts or removed:
                revision = _bump(session, MESH_REVISION)
                for values in upserts:
                    values |= {"revision": revision, "expires_at": expires}
                    session.execute(_insert_on_conflict(
                        self.dialect, MeshInstanceRow, values,
                        keys=("node", "service", "address"),
                        changes={k: v for k, v in values.items()
                                 if k not in ("node", "service", "address")},
                    ))  # fmt: skip
                if removed:
                    session.execute(
                        update(MeshInstanceRow)
                        .where(MeshInstanceRow.node == node, _keys_in(removed))
                        .values(deleted=True, revision=revision)
                        .execution_options(synchronize_session=False)
                    )
                if events:
                    _append_audit_events(session, now, events)
            for (service, address), detail in details:
                session.execute(
                    update(MeshInstanceRow)
                    .where(MeshInstanceRow.node == node, MeshInstanceRow.service == service,
                           MeshInstanceRow.address == address)
                    .values(detail=detail)
                    .execution_options(synchronize_session=False)
                )  # fmt: skip
            if wanted:
                session.execute(
                    update(MeshInstanceRow)
                    .where(MeshInstanceRow.node == node, MeshInstanceRow.deleted.is_(False))
                    .values(expires_at=expires)
                    .execution_options(synchronize_session=False)
                )
        self._follow_revision(before, revision)
        return revision

    def expire_mesh_instances(self) -> list[InstanceKey]:
        """Drop the instances whose lease has passed (their agent stopped reporting);
        returns them."""
        now = self._clock.now()
        with self._reading() as session:  # most seconds nothing expires: no write then
            due = session.scalar(
                select(MeshInstanceRow.node)
                .where(MeshInstanceRow.deleted.is_(False), MeshInstanceRow.expires_at <= now)
                .limit(1)
            )
        if due is None:
            return []
        with self._writing() as session:
            revision = _lock_mesh_revision(session)
            expired = [
                InstanceKey(node, service, address)
                for node, service, address in session.execute(
                    select(MeshInstanceRow.node, MeshInstanceRow.service, MeshInstanceRow.address)
                    .where(MeshInstanceRow.deleted.is_(False), MeshInstanceRow.expires_at <= now)
                )
            ]
            if not expired:
                return []
            before, revision = revision, _bump(session, MESH_REVISION)
            for node in {key.node for key in expired}:
                keys = [(k.service, k.address) for k in expired if k.node == node]
                session.execute(
                    update(MeshInstanceRow)
                    .where(MeshInstanceRow.node == node, _keys_in(keys))
                    .values(deleted=True, revision=revision)
                    .execution_options(synchronize_session=False)
                )
            _append_audit_events(session, now, [
                ("tessera-server", "mesh.instance.expire", f"{k.service} {k.address}",
                 {"node": k.node})
                for k in expired
            ])  # fmt: skip
        self._follow_revision(before, revision)
        return expired

    def mesh_catalog(self) -> Catalog:
        """Every live instance."""
        with self._reading() as session:
            rows = session.scalars(
                select(MeshInstanceRow).where(MeshInstanceRow.deleted.is_(False))
            )
            return Catalog(instance_from_row(row) for row in rows)

    def _follow_revision(self, before: int, after: int) -> None:
        """After a committed catalog change: the cached configuration, unchanged by it,
        is the configuration at ``after`` too (only after the commit: a rolled-back
        revision may be taken by another server's apply)."""
        cached = self._mesh_cached
        if cached is not None and cached[0] == before and after != before:
            self._mesh_cached = (after, cached[1])


def _keys_in(keys: Sequence[tuple[str, str]]) -> Any:
    return or_(*(
        and_(MeshInstanceRow.service == service, MeshInstanceRow.address == address)
        for service, address in keys
    ))  # fmt: skip


def _event(
    node: str, action: str, key: tuple[str, str], reported: ReportedInstance
) -> tuple[str, str, str, dict[str, Any]]:
    details: dict[str, Any] = {"node": node, "spiffe_id": reported.spiffe_id}
    if reported.labels:
        details["labels"] = dict(sorted(reported.labels.items()))
    return (node, action, f"{key[0]} {key[1]}", details)
