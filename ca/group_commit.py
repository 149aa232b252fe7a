"""Group commit: writes that arrive while one is in flight go together in the next.

A thread hands its item to :meth:`GroupCommit.submit` and blocks until the item's
write has ended. When no write is in flight, the item is written at once, alone:
nobody waits for company. While a write is in flight, later items queue; when it
ends, the first queued thread takes every queued item (up to ``max_weight``) and
writes them with one call of ``commit``, which returns one outcome per item: None
(committed) or the exception that item's caller is to raise. When ``commit``
raises, every item of the group fails with that error. Nothing here sleeps or
reads a clock: a group is whatever queued during the previous write::

    group = GroupCommit(commit)                    # commit(items) -> [None | error, ...]
    group.submit(item)                             # returns once committed; raises its error

Each item is written once, in the order it was submitted; the threads waiting on
a group are woken when its write has ended, the next group's writer first.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")

Commit = Callable[[Sequence[Item]], Sequence[BaseException | None]]
"""Write the items in one transaction; one outcome per item, in order."""


class _Ticket(Generic[Item]):
    """One submitted item: its outcome once written, and the lock its thread waits on."""

    __slots__ = ("_wake", "done", "error", "item", "lead", "weight")

    def __init__(self, item: Item, weight: int) -> None:
        self.item = item
        self.weight = weight
        self.done = False
        self.lead = False  # woken to write the next group rather than with an outcome
        self.error: BaseException | None = None
        self._wake = threading.Lock()
        self._wake.acquire()  # released once, by the thread that wakes this one

    def wait(self) -> None:
        self._wake.acquire()

    def wake(self) -> None:
        self._wake.release()


class GroupCommit(Generic[Item]):
    def __init__(
        self,
        commit: Commit[Item],
        *,
        weight: Callable[[Item], int] = lambda _: 1,
        max_weight: int = 1000,
    ) -> None:
        """``weight`` says how big an item is (e.g. its rows); a group stops growing at
        ``max_weight``, except that it always takes at least one item."""
        self._commit = commit
        self._weight = weight
        self._max_weight = max_weight
        self._lock = threading.Lock()
        self._queue: deque[_Ticket[Item]] = deque()
        self._writing = False
        self.groups = 0
        """Groups written so far (for tests and metrics)."""

    @property
    def waiting(self) -> int:
        """Items queued behind the write in flight."""
        with self._lock:
            return len(self._queue)

    def submit(self, item: Item) -> None:
        """Write ``item`` with whatever else is queued; raise the error its write met."""
        ticket = _Ticket(item, self._weight(item))
        with self._lock:
            if self._writing:
                self._queue.append(ticket)
            else:
                self._writing = True
                ticket.lead = True
        if not ticket.lead:
            ticket.wait()
        if not ticket.done:
            self._write_group(ticket)
        if ticket.error is not None:
            raise ticket.error

    def _write_group(self, first: _Ticket[Item]) -> None:
        """Write ``first`` and the items queued after it, then hand the writing on."""
        group = [first]
        with self._lock:
            weight = first.weight
            while self._queue and weight + self._queue[0].weight <= self._max_weight:
                ticket = self._queue.popleft()
                weight += ticket.weight
                group.append(ticket)
        try:
            outcomes = _outcomes(self._commit, [t.item for t in group])
        except BaseException as interrupted:  # KeyboardInterrupt and the like
            outcomes = [interrupted] * len(group)
            raise
        finally:
            self.groups += 1
            seen: set[int] = set()
            for ticket, error in zip(group, outcomes, strict=True):
                # An error several items share: each thread raises its own copy, so their
                # tracebacks do not pile up on one object.
                shared = error is not None and id(error) in seen
                ticket.error = _own_copy(error) if shared else error
                ticket.done = True
                seen.add(id(error))
            with self._lock:
                following = self._queue.popleft() if self._queue else None
                self._writing = following is not None
            if following is not None:
                following.lead = True
                following.wake()
            for ticket in group[1:]:
                ticket.wake()


def _outcomes(commit: Commit[Item], items: list[Item]) -> Sequence[BaseException | None]:
    try:
        outcomes = commit(items)
    except Exception as error:
        return [error] * len(items)
    if len(outcomes) != len(items):
        raise AssertionError(f"a group of {len(items)} items got {len(outcomes)} outcomes")
    return outcomes


def _own_copy(error: BaseException | None) -> BaseException | None:
    """A copy of ``error`` whose cause is the error as the writer met it."""
    if error is None:
        return None
    try:
        mine = copy.copy(error)
    except Exception:
        return error
    if mine is error or type(mine) is not type(error):
        return error
    mine.__cause__ = error
    return mine
