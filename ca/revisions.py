"""Telling waiting agents that the entries, the bundle or the mesh configuration changed,
without polling them.

The datastore's entry revision, bundle sequence and mesh revision are the clocks of
every change an agent must hear of; its agents counter is the clock of changes to
attested agents (what the node API's agent cache follows). The watcher keeps the
latest four in memory — learned at once from this server's own changes
(:meth:`RevisionWatcher.poke`) and by a cheap periodic read for changes made by
other servers on the same database — and wakes every agent long-polling for
something past what it has::

    watcher = RevisionWatcher(store.sync_counters)    # (revision, bundle, agents, mesh)
    asyncio.create_task(watcher.run())
    if watcher.following: ...                          # its values are fresh

While :attr:`RevisionWatcher.following` is false (never read yet, or the last
read failed, or it is older than ``max_staleness``) its values must not stand in
for the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Counters = tuple[int, int, int, int]
"""(entry revision, bundle sequence, agents counter, mesh revision)."""


class RevisionWatcher:
    def __init__(
        self,
        read_counters: Callable[[], Counters],
        *,
        interval: float = 0.2,
        max_staleness: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read_counters
        self._interval = interval
        # A read that hangs (a database cut off without a reset) must not leave
        # old values standing in for it: after a few intervals they are not used.
        self._max_staleness = max_staleness if max_staleness is not None else 5 * interval
        self._monotonic = monotonic
        self.revision = 0
        self.bundle_sequence = 0
        self.agents = 0
        self.mesh_revision = 0
        self._read_at: float | None = None  # when the last read that worked ended
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    @property
    def following(self) -> bool:
        """True while the values are those of a recent read that worked."""
        read_at = self._read_at
        return (
            not self.closed
            and read_at is not None
            and self._monotonic() - read_at <= self._max_staleness
        )

    async def run(self) -> None:
        """Follow the datastore's counters until cancelled."""
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                # Clear before reading: a poke that lands while the read is in flight
                # must cause one more read, not be lost with a read that began too early.
                self._wake.clear()
                try:
                    counters = await asyncio.to_thread(self._read)
                except Exception as err:  # a database outage must not end the watcher
                    self._read_at = None
                    log.warning("cannot read the entry revision: %s", err)
                else:
                    self._read_at = self._monotonic()
                    self._set(*counters)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval)
        finally:
            self._read_at = None

    def close(self) -> None:
        """The server is stopping: release every waiting agent now (they reconnect)."""
        self.closed = True
        self._changed.set()

    def poke(self) -> None:
        """A change was made here: re-read now. Safe to call from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _set(
        self, revision: int, bundle_sequence: int = 0, agents: int = 0, mesh_revision: int = 0
    ) -> None:
        now = (revision, bundle_sequence, agents, mesh_revision)
        if now != self.counters:
            # Agents wait on the first, second and fourth (wait_past); the admin API's
            # watch (the console) on all four.
            self.revision = revision
            self.bundle_sequence = bundle_sequence
            self.agents = agents
            self.mesh_revision = mesh_revision
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    @property
    def counters(self) -> Counters:
        return (self.revision, self.bundle_sequence, self.agents, self.mesh_revision)

    async def wait_changed(self, seen: Counters, timeout: float) -> Counters:
        """Return the counters once any differs from ``seen``, or after ``timeout``
        seconds (the admin API's ``/v1/watch``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.closed and self.counters == seen:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.counters

    async def wait_past(
        self,
        seen: int,
        timeout: float,
        *,
        seen_bundle: int | None = None,
        seen_mesh: int | None = None,
    ) -> int:
        """Return once the revision differs from ``seen`` (or the bundle sequence from
        ``seen_bundle``, or the mesh revision goes past ``seen_mesh``, when given), or
        after ``timeout`` seconds.

        The mesh revision must go *past* the one seen: an agent that has just read a
        newer one from the datastore than this watcher has yet is not woken by the
        watcher catching up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (
            not self.closed
            and self.revision == seen
            and seen_bundle in (None, self.bundle_sequence)
            and (seen_mesh is None or self.mesh_revision <= seen_mesh)
        ):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.revision
