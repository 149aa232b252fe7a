"""``tessera sidecar files``: keep SVID files up to date for programs that read PEM files.

::

    source = connect_x509_source(None, spiffe_id=None)           # $SPIFFE_ENDPOINT_SOCKET
    sidecar = FilesSidecar(source, Path("/run/tessera/svid"),
                           reload=command_reload("nginx -s reload"), on_written=print)
    await sidecar.run(stop)                                       # until ``stop`` is set

At start and after every change the Workload API streams (a rotated SVID, a
new CA in a bundle), the files are written as one generation
(:mod:`sdk.sidecar.svid_files`), then ``reload`` runs. An update that would
write the same bytes again is skipped. A failed write is logged, counted and
tried again after :data:`RETRY_SECONDS`; a failed reload is logged and
counted, and never stops the sidecar. If the Workload API stream fails for
good, :meth:`FilesSidecar.run` raises SourceError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

from sdk.errors import SdkError, SourceError
from sdk.sidecar.metrics import FilesMetrics
from sdk.sidecar.reload import Reload
from sdk.sidecar.svid_files import WrittenSvid, svid_file_set, write_svid_files
from sdk.sources import Unsubscribe, X509Snapshot

__all__ = ["RETRY_SECONDS", "FilesSidecar", "SnapshotSource"]

_log = logging.getLogger("tessera.sidecar")

RETRY_SECONDS: Final = 5.0
_HEALTH_CHECK_SECONDS: Final = 1.0


class SnapshotSource(Protocol):
    """What the files sidecar reads (a :class:`sdk.sources.WorkloadApiX509Source`): whole
    snapshots, change notices, and its health."""

    def snapshot(self) -> X509Snapshot: ...

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe: ...

    def problem(self) -> str | None: ...

    def no_identity(self) -> str | None: ...


class FilesSidecar:
    def __init__(
        self,
        source: SnapshotSource,
        directory: Path,
        *,
        reload: Reload | None = None,
        on_written: Callable[[WrittenSvid], None] = lambda _: None,
        metrics: FilesMetrics | None = None,
    ) -> None:
        self.source = source
        self.directory = directory
        self.metrics = metrics or FilesMetrics()
        self._reload = reload
        self._on_written = on_written
        self._digest: bytes | None = None
        self._written_once = False

    def ready_problem(self) -> str | None:
        """None once the files were written and the source is healthy; else why not."""
        problem = self.source.problem() or self.source.no_identity()
        if problem:
            return problem
        if not self._written_once:
            return f"the SVID files have not been written to {self.directory} yet"
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Write now and after every change until ``stop`` is set."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def notify() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(changed.set)

        unsubscribe = self.source.subscribe(notify)
        try:
            retry_in: float | None = None
            while not stop.is_set():
                changed.clear()
                retry_in = None if await self.write_now() else RETRY_SECONDS
                await self._wait(changed, stop, retry_in)
        finally:
            unsubscribe()

    async def write_now(self) -> bool:
        """Write the current SVID if it differs from what was written; False if that failed.

        While the Workload API withdraws the identity the files stay as they are
        (the source has logged why): a program reading them keeps working until
        the SVID expires, and the next SVID issued is written at once.
        """
        if self.source.no_identity() is not None:
            return True
        try:
            contents = svid_file_set(self.source.snapshot())
            if contents.digest == self._digest:
                return True
            written = await asyncio.to_thread(write_svid_files, self.directory, contents)
        except (OSError, SdkError) as err:
            self.metrics.write_failures.inc()
            reason = err.message if isinstance(err, SdkError) else f"{err.strerror or err}"
            _log.error("cannot write the SVID files into %s: %s; trying again in %gs",
                       self.directory, reason, RETRY_SECONDS)  # fmt: skip
            return False
        self._digest = contents.digest
        self._written_once = True
        self.metrics.writes.inc()
        self.metrics.svid_expiry.set(written.not_after.timestamp())
        self._on_written(written)
        if self._reload is not None:
            ok = await self._reload()
            self.metrics.reloads.labels("ok" if ok else "failed").inc()
        return True

    async def _wait(self, changed: asyncio.Event, stop: asyncio.Event, limit: float | None) -> None:
        """Until a change, ``stop``, or ``limit`` seconds; SourceError if the source died."""
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stop.wait())]
        try:
            while True:
                timeout = _HEALTH_CHECK_SECONDS
                if deadline is not None:
                    timeout = min(timeout, max(deadline - loop.time(), 0))
                done, _ = await asyncio.wait(
                    waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if done or (deadline is not None and loop.time() >= deadline):
                    return
                problem = self.source.problem()
                if problem:
                    raise SourceError(problem)
        finally:
            for waiter in waiters:
                waiter.cancel()
