"""The CA journal: this trust domain's authorities."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ca.datastore.records import AUTHORITY_KINDS, AUTHORITY_STATUSES, Authority
from ca.datastore.schema import AuthorityRow
from ca.datastore.sql.base import SqlBase, _check_choice, _stored_time, _table
from sdk.errors import NotFound


class AuthoritiesMixin(SqlBase):
    """:class:`~ca.datastore.interface.AuthorityStore` on SQL."""

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
