"""Group commit: writes that arrive while one is in flight go together in the next.

A caller hands its item to :meth:`GroupCommit.submit` (a thread, which blocks) or
:meth:`GroupCommit.submit_async` (a coroutine, which awaits) and gets control back
once the item's write has ended. When no write is in flight, the item is written at
once, alone: nobody waits for company. While a write is in flight, later items
queue; when it ends, the queued items (up to ``max_weight``) are written together
with one call of ``commit``, which returns one outcome per item: None (committed)
or the exception that item's caller is to raise. When ``commit`` raises, every
item of the group fails with that error. A group is whatever queued during the
previous write, and, for a group a coroutine leads, during ``gather`` after its
first item (the issuer's: a few milliseconds, so that concurrent requests share a
transaction even when the writing thread has a core of its own)::

    group = GroupCommit(commit, gather=0.005)      # commit(items) -> [None | error, ...]
    group.submit(item)                             # returns once committed; raises its error
    await group.submit_async(item)                 # the same, from the event loop

Who writes: a thread that submits writes its own group (and then hands the writing
to the next queued thread), so a lone thread pays no hand-off; a coroutine must not
block its event loop, so a group led by one is written by the group commit's own
thread, which resolves the group's futures with one callback per event loop. That
thread starts at the end of the event loop's turn (or ``gather`` later), so the items
coroutines submit in the same turn (requests whose bytes arrived together) make one
group; it waits, when its next group's first item is younger than ``gather``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")

Commit = Callable[[Sequence[Item]], Sequence[BaseException | None]]
"""Write the items in one transaction; one outcome per item, in order."""


class _Ticket(Generic[Item]):
    """One submitted item and its outcome once written; a thread waits on ``_wake``, a
    coroutine on ``future``."""

    __slots__ = ("_wake", "at", "done", "error", "future", "item", "lead", "weight")

    def __init__(self, item: Item, weight: int, future: asyncio.Future[None] | None) -> None:
        self.at = 0.0  # when a coroutine submitted it (time.monotonic), with ``gather``
        self.item = item
        self.weight = weight
        self.future = future
        self.done = False
        self.lead = False  # a thread woken to write the next group, not with an outcome
        self.error: BaseException | None = None
        self._wake: threading.Lock | None = None
        if future is None:
            self._wake = threading.Lock()
            self._wake.acquire()  # released once, by the thread that wakes this one

    def wait(self) -> None:
        assert self._wake is not None
        self._wake.acquire()

    def wake(self) -> None:
        assert self._wake is not None
        self._wake.release()


class GroupCommit(Generic[Item]):
    def __init__(
        self,
        commit: Commit[Item],
        *,
        weight: Callable[[Item], int] = lambda _: 1,
        max_weight: int = 1000,
        name: str = "group-commit",
        gather: float = 0.0,
    ) -> None:
        """``weight`` says how big an item is (e.g. its rows); a group stops growing at
        ``max_weight``, except that it always takes at least one item. ``name`` names
        the thread that writes the groups coroutines lead. ``gather`` (seconds): a group
        a coroutine leads is written that long after its first item was submitted, at
        the soonest, so that the items submitted meanwhile join it (0: at the end of the
        event loop's turn); a thread's item is written at once, as ever."""
        self._commit = commit
        self._gather = gather
        self._weight = weight
        self._max_weight = max_weight
        self._name = name
        self._lock = threading.Lock()
        self._queue: deque[_Ticket[Item]] = deque()
        self._writing = False
        self._writer: ThreadPoolExecutor | None = None
        self.groups = 0
        """Groups written so far (for tests and metrics)."""

    @property
    def waiting(self) -> int:
        """Items queued behind the write in flight."""
        with self._lock:
            return len(self._queue)

    def submit(self, item: Item) -> None:
        """Write ``item`` with whatever else is queued; raise the error its write met."""
        ticket: _Ticket[Item] = _Ticket(item, self._weight(item), None)
        with self._lock:
            if self._writing:
                self._queue.append(ticket)
            else:
                self._writing = True
                ticket.lead = True
        if not ticket.lead:
            ticket.wait()
        if not ticket.done:
            following = self._write_group(ticket, own=ticket)
            assert following is None  # a thread hands a coroutine's group to the writer
        if ticket.error is not None:
            raise ticket.error

    async def submit_async(self, item: Item) -> None:
        """:meth:`submit` for a coroutine: the write happens in another thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        ticket = _Ticket(item, self._weight(item), future)
        if self._gather:
            ticket.at = time.monotonic()
        with self._lock:
            if self._writing:
                self._queue.append(ticket)
                lead = False
            else:
                self._writing = True
                lead = True
        if lead:
            # Handed to the writing thread at the end of this turn of the event loop (or
            # ``gather`` later), not now: the batches other requests sign meanwhile join.
            if self._gather:
                loop.call_later(self._gather, self._start_writer, ticket)
            else:
                loop.call_soon(self._start_writer, ticket)
        await future
        if ticket.error is not None:
            raise ticket.error

    def _start_writer(self, first: _Ticket[Item]) -> None:
        with self._lock:
            self._hand_to_writer(first)

    def _hand_to_writer(self, first: _Ticket[Item]) -> None:
        """Have the group commit's thread write the group ``first`` (a coroutine's) leads;
        called with the lock held."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._writer.submit(self._write_groups, first)

    def _write_groups(self, first: _Ticket[Item] | None) -> None:
        """The group commit's thread: write groups while coroutines lead them; each is
        written ``gather`` after its first item, at the soonest."""
        while first is not None:
            if self._gather:
                wait = first.at + self._gather - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # this thread's own wait: items queue meanwhile
            first = self._write_group(first, own=None)

    def _write_group(
        self, first: _Ticket[Item], *, own: _Ticket[Item] | None
    ) -> _Ticket[Item] | None:
        """Write ``first`` and the items queued after it, then hand the writing on and
        tell every item's caller but ``own`` (the calling thread's). Returns the first
        item of the next group when the group commit's thread (``own`` None) is to
        write it (a coroutine's item leads it)."""
        group = [first]
        with self._lock:
            weight = first.weight
            while self._queue and weight + self._queue[0].weight <= self._max_weight:
                ticket = self._queue.popleft()
                weight += ticket.weight
                group.append(ticket)
        interrupted = True
        try:
            outcomes = _outcomes(self._commit, [t.item for t in group])
            interrupted = False
        except BaseException as interruption:  # KeyboardInterrupt and the like
            outcomes = [interruption] * len(group)
            raise
        finally:
            self.groups += 1
            seen: set[int] = set()
            for ticket, error in zip(group, outcomes, strict=True):
                # An error several items share: each caller raises its own copy, so their
                # tracebacks do not pile up on one object.
                shared = error is not None and id(error) in seen
                ticket.error = _own_copy(error) if shared else error
                ticket.done = True
                seen.add(id(error))
            following: _Ticket[Item] | None = None
            with self._lock:
                following = self._queue.popleft() if self._queue else None
                self._writing = following is not None
                coroutine_s = following is not None and following.future is not None
                if following is not None and coroutine_s and (own is not None or interrupted):
                    self._hand_to_writer(following)
                    following = None
            if following is not None and following.future is None:
                following.lead = True
                following.wake()
                following = None
            _tell(ticket for ticket in group if ticket is not own)
        return following


def _tell(tickets: Iterable[_Ticket[Item]]) -> None:
    """Wake the threads; resolve the futures with one callback per event loop."""
    futures: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for ticket in tickets:
        if ticket.future is None:
            ticket.wake()
        else:
            futures.setdefault(ticket.future.get_loop(), []).append(ticket.future)
    for loop, waiting in futures.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_resolve, waiting)


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():  # a cancelled waiter's item is written all the same
            future.set_result(None)


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
