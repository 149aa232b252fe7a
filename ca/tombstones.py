"""When the server may forget the tombstones deleted entries leave.

A tombstone tells a reader of :meth:`~ca.datastore.interface.EntryStore.entries_changed_since`
that an entry went. Agents do not need it: every sync answer names all the entries
the agent gets (``entry_ids``), so an agent drops a deleted entry whatever revision
it synced from, even one older than the tombstones purged so far. A tombstone is
kept for ``tombstone_retention`` (24 h by default) and then purged, so the entries
table stays bounded however many entries come and go.

The datastore does not record when an entry was deleted, only at which revision,
so the horizon is kept in time: the server samples the entry revision on its tick,
and the revision current ``retention`` ago is the horizon, below which tombstones
go::

    horizon = TombstoneHorizon(timedelta(hours=24))
    horizon.sample(clock.now(), store.current_revision())
    store.purge_tombstones(horizon.revision(clock.now()))

Right after a start the horizon is 0 (nothing is purged) until the server has
watched for ``retention``. The horizon never goes back, and the datastore's purge
never lowers its ``purged_revision``, so several servers may purge on one database.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta

DEFAULT_TOMBSTONE_RETENTION = timedelta(hours=24)


class TombstoneHorizon:
    """The entry revision that was current ``retention`` ago, from samples."""

    def __init__(self, retention: timedelta) -> None:
        self.retention = retention
        self._samples: deque[tuple[datetime, int]] = deque()
        self._horizon = 0

    def sample(self, now: datetime, revision: int) -> None:
        """Note that ``revision`` was current at ``now`` (only a change is kept, so
        there is at most one sample per change of the revision)."""
        if not self._samples or self._samples[-1][1] != revision:
            self._samples.append((now, revision))

    def revision(self, now: datetime) -> int:
        """The newest sampled revision seen at least ``retention`` before ``now``: every
        change up to it was made that long ago. 0 before there is one."""
        cutoff = now - self.retention
        while self._samples and self._samples[0][0] <= cutoff:
            _, revision = self._samples.popleft()
            self._horizon = max(self._horizon, revision)
        return self._horizon
