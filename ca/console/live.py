"""Pages that update without a reload: what changed, told to every open page.

One task long-polls the admin API's ``/v1/watch`` (entries, bundle, agents, mesh) for
all open pages together, and a timer says ``metrics`` every ``metrics_interval`` when
Prometheus is read; each page holds a server-sent-events stream (``/events``) and
re-fetches its own content when a change it shows arrives. A page that does not keep up
loses old events, not new ones (each stream's queue is bounded), and the number of
streams is bounded too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ca.console.sources import AdminSource, SourceError

log = logging.getLogger(__name__)

WATCH_SECONDS = 25
RETRY_SECONDS = 2.0
HEARTBEAT_SECONDS = 15.0
MAX_STREAMS = 64
QUEUE_SIZE = 16
UNREACHABLE = "unreachable"
"""Told to the pages when the server's admin API stops answering ..."""
REACHABLE = "reachable"
"""... and when it answers again."""


class TooManyStreams(Exception):
    pass


class Changes:
    """Fans the server's changes (and the metrics timer) out to the open pages."""

    def __init__(
        self,
        admin: AdminSource,
        *,
        metrics_interval: float | None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._admin = admin
        self._metrics_interval = metrics_interval
        self._sleep = sleep
        self._queues: set[asyncio.Queue[list[str]]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.token: str | None = None
        """The server's change counters as last seen (the admin API's watch token)."""
        self.problem: str | None = None
        """Why the server cannot be followed now; None while it can."""
        self.listeners: list[Callable[[list[str]], None]] = []
        """Told of every change too (the console's own bookkeeping)."""

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._watch()))
        if self._metrics_interval is not None:
            self._tasks.append(asyncio.create_task(self._tick(self._metrics_interval)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def publish(self, changed: list[str]) -> None:
        for listener in self.listeners:
            listener(changed)
        for queue in self._queues:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(changed)

    async def stream(self) -> AsyncIterator[bytes]:
        """One page's events, as ``text/event-stream`` lines; :class:`TooManyStreams`
        when :data:`MAX_STREAMS` pages listen already."""
        if len(self._queues) >= MAX_STREAMS:
            raise TooManyStreams()
        queue: asyncio.Queue[list[str]] = asyncio.Queue(QUEUE_SIZE)
        self._queues.add(queue)
        return self._events(queue)

    async def _events(self, queue: asyncio.Queue[list[str]]) -> AsyncIterator[bytes]:
        try:
            yield b"retry: 2000\n\n"
            while True:
                try:
                    async with asyncio.timeout(HEARTBEAT_SECONDS):
                        changed = await queue.get()
                except TimeoutError:
                    yield b": still here\n\n"
                    continue
                yield f"data: {json.dumps({'changed': changed})}\n\n".encode()
        finally:
            self._queues.discard(queue)

    async def _watch(self) -> None:
        while True:
            try:
                # Back from a problem, ask without waiting: the answer says it is back.
                wait = WATCH_SECONDS if self.token and self.problem is None else None
                answer = await self._admin.get(
                    "/v1/watch", {"since": self.token, "timeout": wait},
                    timeout=WATCH_SECONDS + 10,
                )
            except SourceError as err:
                went_away = self.problem is None
                self.problem = str(err)
                if went_away:
                    log.warning("cannot follow the server's changes: %s", err)
                    self.publish([UNREACHABLE])
                await self._sleep(RETRY_SECONDS)
                continue
            if self.problem is not None:
                self.problem = None
                self.publish([REACHABLE, "entries", "bundle", "agents", "mesh"])  # catch up
            self.token = str(answer.get("token"))
            changed = [str(c) for c in answer.get("changed", [])]
            if changed:
                self.publish(changed)

    async def _tick(self, interval: float) -> None:
        while True:
            await self._sleep(interval)
            if self._queues:
                self.publish(["metrics"])
