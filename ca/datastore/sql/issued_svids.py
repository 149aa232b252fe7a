"""The record of issued SVIDs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Dialect

from ca.datastore.interface import RevisionMoved
from ca.datastore.records import AUTHORITY_KINDS, AuditNote, IssuedSvid
from ca.datastore.schema import ENTRY_REVISION, IssuedSvidRow
from ca.datastore.sql.audit import _append_audit_events, _audit_details
from ca.datastore.sql.base import SqlBase, _check_choice, _counter, _table
from sdk.errors import InvalidArgument


class IssuedSvidsMixin(SqlBase):
    """:class:`~ca.datastore.interface.IssuedSvidStore` on SQL."""

    def record_issued_svids(
        self,
        svids: Sequence[IssuedSvid],
        *,
        audit: AuditNote | Sequence[AuditNote] | None = None,
        revision: int | None = None,
    ) -> None:
        """Record issued SVIDs in one batch (one executemany); AlreadyExists (and
        nothing recorded) if a serial repeats. ``audit``, the issuance's audit event
        (or events, chained in order: one per agent of a group of issuances), is
        chained to the audit log in the same transaction: the record of SVIDs
        expires with them, the audit log keeps every issuance.

        ``revision``, when given, is the entry revision the SVIDs' entries were
        authorized at: the transaction reads the entry revision before it writes,
        and raises :class:`~ca.datastore.interface.RevisionMoved` (nothing
        written) when it is another.

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
        notes = [audit] if isinstance(audit, AuditNote) else list(audit or ())
        events = [
            (note.actor, note.action, note.target, _audit_details(note.details))
            for note in notes
        ]
        with self._writing_core(conflict=conflict) as connection:
            if revision is not None:
                current = _counter(connection, ENTRY_REVISION)
                if current != revision:
                    raise RevisionMoved(revision, current)
            connection.exec_driver_sql(statement.sql, parameters)
            if events:
                _append_audit_events(connection, self._clock.now(), events)

    def count_issued_svids(self) -> int:
        with self._reading() as session:
            return session.scalar(select(func.count()).select_from(IssuedSvidRow)) or 0

    def list_issued_svids(
        self,
        *,
        valid_at: datetime,
        expiring_before: datetime | None = None,
        spiffe_id: str | None = None,
        agent_id: str | None = None,
        limit: int = 200,
    ) -> tuple[list[IssuedSvid], int]:
        """SVIDs still valid at ``valid_at`` (of ``spiffe_id``, asked by ``agent_id``), and
        how many in all. With ``expiring_before``: those expiring before it, soonest
        first; otherwise the newest (latest expiry) first."""
        conditions = [IssuedSvidRow.expires_at > valid_at]
        if expiring_before is not None:
            conditions.append(IssuedSvidRow.expires_at < expiring_before)
        if spiffe_id is not None:
            conditions.append(IssuedSvidRow.spiffe_id == spiffe_id)
        if agent_id is not None:
            conditions.append(IssuedSvidRow.agent_id == agent_id)
        order = (IssuedSvidRow.expires_at.asc() if expiring_before is not None
                 else IssuedSvidRow.expires_at.desc())
        page = select(IssuedSvidRow).where(*conditions).order_by(
            order, IssuedSvidRow.serial).limit(limit)
        total = select(func.count()).select_from(IssuedSvidRow).where(*conditions)
        with self._reading() as session:
            found = [IssuedSvid(row.serial, row.spiffe_id, row.kind, row.agent_id,
                                row.authority_id, row.expires_at)
                     for row in session.scalars(page)]
            return found, session.scalar(total) or 0

    def prune_issued_svids(self, expired_before: datetime) -> int:
        """Forget SVIDs that expired before ``expired_before``; returns how many."""
        with self._writing() as session:
            result = session.connection().execute(
                delete(_table(IssuedSvidRow)).where(IssuedSvidRow.expires_at < expired_before)
            )
            return result.rowcount


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
