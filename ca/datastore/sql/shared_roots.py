"""Shared roots (the shared-root upstream authority)."""

from __future__ import annotations

from dataclasses import fields as dataclass_fields

from sqlalchemy import select

from ca.datastore.records import SharedRoot
from ca.datastore.schema import SharedRootRow
from ca.datastore.sql.base import SqlBase


class SharedRootsMixin(SqlBase):
    """:class:`~ca.datastore.interface.SharedRootStore` on SQL."""

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


_SHARED_ROOT_FIELDS = tuple(f.name for f in dataclass_fields(SharedRoot))


def _shared_root_record(row: SharedRootRow) -> SharedRoot:
    return SharedRoot(**{f: getattr(row, f) for f in _SHARED_ROOT_FIELDS})
