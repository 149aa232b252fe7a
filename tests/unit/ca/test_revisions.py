"""RevisionWatcher: long-polling agents wake when the entry revision moves.

The datastore is a fake read function. The watcher's periodic read is set to a
minute, so anything seen sooner came from poke(); nothing here sleeps to wait
for something to happen.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from ca.revisions import Counters, RevisionWatcher

LONG = 60.0  # the periodic read never comes during a test
PATIENCE = 5.0  # how long a test waits for something that should come at once


class FakeRevisions:
    """The datastore's counters (the revision moves; the agents counter may), recording
    reads, optionally failing or blocking one of them."""

    def __init__(self, revision: int = 1) -> None:
        self.revision = revision
        self.agents = 0
        self.mesh = 0
        self.reads = 0
        self.fail_reads: set[int] = set()
        self.hold_read: int | None = None
        self.held = threading.Event()  # the held read has begun
        self.release = threading.Event()  # let the held read return
        self.read_done = threading.Event()

    def __call__(self) -> Counters:
        self.reads += 1
        number = self.reads
        seen = (self.revision, 0, self.agents, self.mesh)  # what a snapshot taken now shows
        if number in self.fail_reads:
            self.read_done.set()
            raise ConnectionError("the database is not answering")
        if number == self.hold_read:
            self.held.set()
            self.release.wait(PATIENCE)
        self.read_done.set()
        return seen


@asynccontextmanager
async def watching(read: Callable[[], Counters]) -> AsyncIterator[RevisionWatcher]:
    watcher = RevisionWatcher(read, interval=LONG)
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def elapsed(awaitable: Awaitable[int]) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await awaitable
    return result, loop.time() - start


def test_wait_past_returns_at_once_when_the_revision_already_differs():
    async def scenario() -> None:
        async with watching(FakeRevisions(7)) as watcher:
            assert await asyncio.wait_for(watcher.wait_past(0, LONG), PATIENCE) == 7

            revision, took = await elapsed(watcher.wait_past(3, LONG))

            assert revision == 7
            assert took < 1.0

    asyncio.run(scenario())


def test_wait_past_returns_the_new_revision_soon_after_a_poke():
    async def scenario() -> None:
        revisions = FakeRevisions(1)
        async with watching(revisions) as watcher:
            assert await asyncio.wait_for(watcher.wait_past(0, LONG), PATIENCE) == 1
            waiter = asyncio.ensure_future(watcher.wait_past(1, LONG))
            await asyncio.sleep(0)  # let the waiter start waiting
            assert not waiter.done()

            revisions.revision = 2
            watcher.poke()

            revision, took = await elapsed(asyncio.wait_for(waiter, PATIENCE))
            assert revision == 2
            assert took < 1.0

    asyncio.run(scenario())


def test_poke_works_from_another_thread():
    async def scenario() -> None:
        revisions = FakeRevisions(1)
        async with watching(revisions) as watcher:
            assert await asyncio.wait_for(watcher.wait_past(0, LONG), PATIENCE) == 1
            waiter = asyncio.ensure_future(watcher.wait_past(1, LONG))
            revisions.revision = 2

            await asyncio.to_thread(watcher.poke)

            assert await asyncio.wait_for(waiter, PATIENCE) == 2

    asyncio.run(scenario())


def test_a_poke_during_a_read_is_not_lost():
    async def scenario() -> None:
        revisions = FakeRevisions(1)
        revisions.hold_read = 2
        async with watching(revisions) as watcher:
            assert await asyncio.wait_for(watcher.wait_past(0, LONG), PATIENCE) == 1
            watcher.poke()  # read 2 starts and is held, seeing revision 1
            assert await asyncio.to_thread(revisions.held.wait, PATIENCE)
            waiter = asyncio.ensure_future(watcher.wait_past(1, LONG))

            revisions.revision = 2  # a change committed while read 2 is in flight
            watcher.poke()
            await asyncio.sleep(0)  # the poke is delivered while read 2 is still held
            revisions.release.set()

            assert await asyncio.wait_for(waiter, PATIENCE) == 2

    asyncio.run(scenario())


def test_a_mesh_change_wakes_an_agent_that_names_its_mesh_revision():
    async def scenario() -> None:
        revisions = FakeRevisions(1)
        revisions.mesh = 3
        async with watching(revisions) as watcher:
            assert await asyncio.wait_for(watcher.wait_past(0, LONG), PATIENCE) == 1
            naming = asyncio.ensure_future(watcher.wait_past(1, LONG, seen_mesh=3))
            ahead = asyncio.ensure_future(watcher.wait_past(1, LONG, seen_mesh=5))
            not_naming = asyncio.ensure_future(watcher.wait_past(1, LONG))
            await asyncio.sleep(0)
            assert not naming.done()

            revisions.mesh = 4
            watcher.poke()

            assert await asyncio.wait_for(naming, PATIENCE) == 1
            assert watcher.mesh_revision == 4
            for _ in range(10):  # turns of the loop for the others to wake, were they to
                await asyncio.sleep(0)
            # An agent that read revision 5 from the database before this watcher did is
            # not woken by the watcher catching up to 4; one not asking about the mesh
            # is not woken by it at all.
            assert not ahead.done() and not not_naming.done()
            ahead.cancel()
            not_naming.cancel()
            await asyncio.gather(ahead, not_naming, return_exceptions=True)

    asyncio.run(scenario())


def test_wait_past_returns_the_same_revision_after_the_timeout():
    async def scenario() -> None:
        async with watching(FakeRevisions(4)) as watcher:
            assert await asyncio.wait_for(watcher.wait_past(0, LONG), PATIENCE) == 4

            revision, took = await elapsed(watcher.wait_past(4, 0.05))

            assert revision == 4
            assert 0.05 <= took < 1.0

    asyncio.run(scenario())


def test_wait_past_without_a_running_watcher_times_out():
    async def scenario() -> None:
        watcher = RevisionWatcher(FakeRevisions(9))
        assert await watcher.wait_past(0, 0.05) == 0  # nothing has been read yet

    asyncio.run(scenario())


def test_a_failed_read_does_not_end_the_watcher(caplog):
    async def scenario() -> None:
        revisions = FakeRevisions(3)
        revisions.fail_reads = {1}
        async with watching(revisions) as watcher:
            assert await asyncio.to_thread(revisions.read_done.wait, PATIENCE)
            waiter = asyncio.ensure_future(watcher.wait_past(0, LONG))

            watcher.poke()

            assert await asyncio.wait_for(waiter, PATIENCE) == 3

    with caplog.at_level(logging.WARNING, logger="ca.revisions"):
        asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records] == [
        "cannot read the entry revision: the database is not answering"
    ]


def test_close_releases_waiting_long_polls_at_once() -> None:
    async def scenario() -> float:
        watcher = RevisionWatcher(lambda: (1, 0, 0, 0))
        watcher._set(1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        waiting = asyncio.create_task(watcher.wait_past(1, timeout=30))
        await asyncio.sleep(0)
        watcher.close()
        assert await waiting == 1
        return loop.time() - began

    assert asyncio.run(scenario()) < 5  # far below the 30 s it would otherwise wait


# -- following: whether the watcher's values may stand in for the database ---------------


async def settle(condition: Callable[[], bool]) -> None:
    """Give the event loop turns (not time) until ``condition`` holds."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_following_only_after_a_read_that_worked_and_only_while_it_is_recent():
    async def scenario() -> None:
        revisions = FakeRevisions(5)
        revisions.agents = 3
        monotonic = FakeMonotonic()
        watcher = RevisionWatcher(revisions, interval=LONG, max_staleness=2.0,
                                  monotonic=monotonic)
        assert watcher.following is False  # nothing read yet
        task = asyncio.create_task(watcher.run())
        try:
            assert await asyncio.wait_for(watcher.wait_past(0, LONG), PATIENCE) == 5
            assert (watcher.agents, watcher.following) == (3, True)

            monotonic.now += 2.0
            assert watcher.following is True
            monotonic.now += 0.5  # the next read would be overdue: a read hangs
            assert watcher.following is False
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        monotonic.now -= 2.5
        assert watcher.following is False  # no longer running

    asyncio.run(scenario())


def test_a_failed_read_stops_following_until_a_read_works_again(caplog):
    async def scenario() -> None:
        revisions = FakeRevisions(2)
        revisions.fail_reads = {2}
        async with watching(revisions) as watcher:
            assert await asyncio.wait_for(watcher.wait_past(0, LONG), PATIENCE) == 2
            assert watcher.following is True
            revisions.read_done.clear()
            watcher.poke()
            assert await asyncio.to_thread(revisions.read_done.wait, PATIENCE)
            await settle(lambda: not watcher.following)
            assert watcher.following is False

            revisions.revision = 3
            watcher.poke()
            assert await asyncio.wait_for(watcher.wait_past(2, LONG), PATIENCE) == 3
            assert watcher.following is True

    with caplog.at_level(logging.WARNING, logger="ca.revisions"):
        asyncio.run(scenario())


def test_closing_stops_following():
    async def scenario() -> None:
        async with watching(FakeRevisions(1)) as watcher:
            assert await asyncio.wait_for(watcher.wait_past(0, LONG), PATIENCE) == 1
            watcher.close()
            assert watcher.following is False

    asyncio.run(scenario())


def test_the_agents_counter_is_followed_without_waking_long_polls():
    async def scenario() -> None:
        revisions = FakeRevisions(4)
        async with watching(revisions) as watcher:
            assert await asyncio.wait_for(watcher.wait_past(0, LONG), PATIENCE) == 4
            waiter = asyncio.ensure_future(watcher.wait_past(4, LONG))
            revisions.agents = 9
            revisions.read_done.clear()

            watcher.poke()
            assert await asyncio.to_thread(revisions.read_done.wait, PATIENCE)
            await settle(lambda: watcher.agents == 9)

            assert watcher.agents == 9
            assert not waiter.done()
            waiter.cancel()

    asyncio.run(scenario())
