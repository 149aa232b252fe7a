"""A time limit on each of a connection's waits, with one timer per connection.

A proxy's connection waits again and again for the same kind of thing (the next request
head from a kept-alive client, the response head from a pooled upstream), each wait
under the same limit::

    idle = Deadline(IDLE_TIMEOUT_SECONDS)
    while True:
        head = await idle.wait(read_request_head(client))   # TimeoutError when late
        ...
    idle.cancel()                                           # the connection is done

``asyncio.timeout`` does the same for one wait: it adds a timer to the loop on the way
in and cancels it on the way out, a timer handle, a heap entry and a few calls per
request. A :class:`Deadline` keeps one timer while the connection lasts: each wait only
moves the due time, and when the timer fires it looks at the due time then, sets itself
again for a later one, or cancels the waiting task if the wait is late. The cancellation
comes back out of :meth:`Deadline.wait` as ``TimeoutError``, as with ``asyncio.timeout``
(a cancellation from elsewhere stays a cancellation).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["Deadline"]

T = TypeVar("T")


class Deadline:
    """Each :meth:`wait` ends in TimeoutError if it takes longer than ``seconds``."""

    __slots__ = ("_due", "_late", "_task", "_timer", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._timer: asyncio.TimerHandle | None = None
        self._due: float | None = None
        """When the wait in progress is late (None: none is in progress)."""
        self._task: asyncio.Task[object] | None = None
        self._late = False

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result; TimeoutError if it has not come within :attr:`seconds`."""
        task = asyncio.current_task()
        assert task is not None, "a Deadline is waited on from a task"
        loop = task.get_loop()
        self._task = task
        self._due = due = loop.time() + self.seconds
        if self._timer is None:
            self._timer = loop.call_at(due, self._fire)
        try:
            result = await awaitable
        except asyncio.CancelledError:
            if self._late:
                self._late = False
                if task.uncancel() == 0:  # cancelled by the deadline alone
                    raise TimeoutError from None
            raise
        finally:
            self._due = None
            self._task = None
        if self._late:  # the deadline fired as the result came: its cancellation withdrawn
            self._late = False
            task.uncancel()
        return result

    def cancel(self) -> None:
        """Drop the timer (the connection is done); a later :meth:`wait` sets it again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        due, task = self._due, self._task
        if due is None or task is None:
            return  # no wait in progress: the next one sets the timer again
        loop = task.get_loop()
        if loop.time() < due:
            self._timer = loop.call_at(due, self._fire)
        elif not self._late:
            self._late = True
            task.cancel()
