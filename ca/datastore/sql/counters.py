"""The counters: the entry revision, the agents counter, the bundle sequence and the mesh
revision."""

from __future__ import annotations

from sqlalchemy import select

from ca.datastore.schema import (
    AGENT_CHANGES,
    BUNDLE_SEQUENCE,
    ENTRY_REVISION,
    MESH_REVISION,
    CounterRow,
)
from ca.datastore.sql.base import SqlBase, _bump, _counter


class CountersMixin(SqlBase):
    """What a server follows to hear of changes: :class:`~ca.datastore.interface.Counters`."""

    def current_revision(self) -> int:
        """The global entry revision: 0 for a new store, then one more per change."""
        with self._reading() as session:
            return _counter(session, ENTRY_REVISION)

    def agent_changes(self) -> int:
        """The agents counter: 0 for a new store, then one more per agent change."""
        with self._reading() as session:
            return _counter(session, AGENT_CHANGES)

    def sync_counters(self) -> tuple[int, int, int, int]:
        """(entry revision, bundle sequence, agents counter, mesh revision), read
        together in one query: what a server follows to hear of changes made by others."""
        names = (ENTRY_REVISION, BUNDLE_SEQUENCE, AGENT_CHANGES, MESH_REVISION)
        query = select(CounterRow.name, CounterRow.value).where(CounterRow.name.in_(names))
        with self._reading() as session:
            values = {name: int(value) for name, value in session.execute(query)}
        return (
            values[ENTRY_REVISION],
            values[BUNDLE_SEQUENCE],
            values[AGENT_CHANGES],
            values[MESH_REVISION],
        )

    def bundle_sequence(self) -> int:
        """The trust bundle's ``spiffe_sequence`` (0 before the first bump)."""
        with self._reading() as session:
            return _counter(session, BUNDLE_SEQUENCE)

    def bump_bundle_sequence(self) -> int:
        """Increment the bundle sequence atomically; returns the new value."""
        with self._writing() as session:
            return _bump(session, BUNDLE_SEQUENCE)
