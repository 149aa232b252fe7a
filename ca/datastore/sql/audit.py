"""The audit log: a hash chain, append-only."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ca.datastore.audit import GENESIS, event_digest
from ca.datastore.records import AuditEvent, AuditVerification
from ca.datastore.schema import AuditEventRow, AuditHeadRow
from ca.datastore.sql.base import SqlBase, _stored_time
from sdk.errors import FailedPrecondition, InvalidArgument

AUDIT_HEAD = "head"


class AuditMixin(SqlBase):
    """:class:`~ca.datastore.interface.AuditLog` on SQL."""

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
            return _append_audit(session, at, actor, action, target, recorded)

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


def _append_audit(
    session: Session | Connection,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any],
) -> AuditEvent:
    """Chain an event to the audit log in the caller's transaction. The head row's lock
    (PostgreSQL) queues concurrent writers, so the chain has no forks."""
    [event] = _append_audit_events(session, at, [(actor, action, target, details)])
    return event


def _append_audit_events(
    session: Session | Connection,
    at: datetime,
    events: Sequence[tuple[str, str, str, dict[str, Any]]],
) -> list[AuditEvent]:
    """Chain (actor, action, target, details) events to the audit log, in order, in the
    caller's transaction, taking the head row's lock once. Core statements, not the
    ORM: every issuance writes here."""
    connection = session.connection() if isinstance(session, Session) else session
    head = connection.execute(_HEAD_FOR_UPDATE).one_or_none()
    if head is None:
        raise FailedPrecondition("the audit log has no head row; run the migrations")
    previous = head.last_hash
    written = []
    for actor, action, target, details in events:
        inserted = connection.execute(
            _INSERT_EVENT,
            {"at": at, "actor": actor, "action": action, "target": target,
             "details": details, "prev_hash": previous, "hash": ""},
        )  # fmt: skip
        key = inserted.inserted_primary_key
        assert key is not None
        event_id = int(key[0])
        digest = event_digest(previous, event_id, at, actor, action, target, details)
        connection.execute(_SET_HASH, {"event_id": event_id, "digest": digest})
        written.append(AuditEvent(event_id, _stored_time(at), actor, action, target,
                                  dict(details), digest))  # fmt: skip
        previous = digest
    if written:
        connection.execute(
            _MOVE_HEAD, {"last_id": written[-1].id, "last_hash": written[-1].hash}
        )
    return written


_EVENTS = AuditEventRow.__table__
_HEADS = AuditHeadRow.__table__
assert isinstance(_EVENTS, Table) and isinstance(_HEADS, Table)
_HEAD_FOR_UPDATE = (
    select(_HEADS.c.last_id, _HEADS.c.last_hash)
    .where(_HEADS.c.name == AUDIT_HEAD)
    .with_for_update()
)
_INSERT_EVENT = insert(_EVENTS)
_SET_HASH = (
    update(_EVENTS)
    .where(_EVENTS.c.id == bindparam("event_id"))
    .values(hash=bindparam("digest"))
)
_MOVE_HEAD = (
    update(_HEADS)
    .where(_HEADS.c.name == AUDIT_HEAD)
    .values(last_id=bindparam("last_id"), last_hash=bindparam("last_hash"))
)


def _audit_details(details: Mapping[str, Any]) -> dict[str, Any]:
    recorded = dict(details)
    try:
        json.dumps(recorded)
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"audit details must be plain JSON values: {error}") from error
    return recorded


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
