"""Telling waiting agents that the entries or the bundle changed, without polling them.

The datastore's entry revision and bundle sequence are the clocks of every
change an agent must hear of. The watcher keeps the latest pair in memory —
learned at once from this server's own changes (:meth:`RevisionWatcher.poke`)
and by a cheap periodic read for changes made by other servers on the same
database — and wakes every agent long-polling for something past what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class RevisionWatcher:
    def __init__(
        self,
        read_revision: Callable[[], int],
        read_bundle_sequence: Callable[[], int] = lambda: 0,
        *,
        interval: float = 0.2,
    ) -> None:
        self._read = read_revision
        self._read_bundle = read_bundle_sequence
        self._interval = interval
        self.revision = 0
        self.bundle_sequence = 0
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    async def run(self) -> None:
        """Follow the datastore's revision until cancelled."""
        self._loop = asyncio.get_running_loop()
        while True:
            # Clear before reading: a poke that lands while the read is in flight
            # must cause one more read, not be lost with a read that began too early.
            self._wake.clear()
            try:
                self._set(*await asyncio.to_thread(self._read_both))
            except Exception as err:  # a database outage must not end the watcher
                log.warning("cannot read the entry revision: %s", err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)

    def close(self) -> None:
        """The server is stopping: release every waiting agent now (they reconnect)."""
        self.closed = True
        self._changed.set()

    def poke(self) -> None:
        """A change was made here: re-read now. Safe to call from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _read_both(self) -> tuple[int, int]:
        return self._read(), self._read_bundle()

    def _set(self, revision: int, bundle_sequence: int = 0) -> None:
        if (revision, bundle_sequence) != (self.revision, self.bundle_sequence):
            self.revision = revision
            self.bundle_sequence = bundle_sequence
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def wait_past(
        self, seen: int, timeout: float, *, seen_bundle: int | None = None
    ) -> int:
        """Return once the revision differs from ``seen`` (or the bundle sequence from
        ``seen_bundle``, when given), or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (
            not self.closed
            and self.revision == seen
            and seen_bundle in (None, self.bundle_sequence)
        ):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.revision
