"""The audit log: a hash chain, append-only."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
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
