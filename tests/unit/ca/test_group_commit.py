"""Group commit: what queues while a write is in flight is written together next.

Nothing here sleeps: the first write is held on an event until the test has seen
the others queue behind it (polled with a deadline), then released.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from ca.group_commit import GroupCommit
from sdk.errors import AlreadyExists, Unavailable

DEADLINE = 10.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for something another thread does (not for time to pass)."""
    deadline = time.monotonic() + DEADLINE
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        pause.wait(0.005)


class HeldWrites:
    """A commit function recording each group and the thread that wrote it; the first
    write waits for release()."""

    def __init__(self, outcome: Callable[[Sequence[str]], Sequence[BaseException | None]]
                 = lambda items: [None] * len(items)) -> None:  # fmt: skip
        self.groups: list[list[str]] = []
        self.threads: list[str] = []
        self.entered = threading.Event()
        self._release = threading.Event()
        self._outcome = outcome

    def __call__(self, items: Sequence[str]) -> Sequence[BaseException | None]:
        self.groups.append(list(items))
        self.threads.append(threading.current_thread().name)
        if len(self.groups) == 1:
            self.entered.set()
            assert self._release.wait(DEADLINE), "the test never released the first write"
        return self._outcome(items)

    def release(self) -> None:
        self._release.set()


class Submitter(threading.Thread):
    """A thread submitting one item; what it got is in ``error`` once joined."""

    def __init__(self, group: GroupCommit[str], item: str) -> None:
        super().__init__(name=f"submit-{item}", daemon=True)
        self.group = group
        self.item = item
        self.returned = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.group.submit(self.item)
            self.returned = True
        except BaseException as error:  # the test inspects it
            self.error = error


def held_then(group: GroupCommit[str], writes: HeldWrites, items: list[str]) -> list[Submitter]:
    """Submit "first" (its write is held), then ``items`` behind it; release; join all."""
    first = Submitter(group, "first")
    first.start()
    assert writes.entered.wait(DEADLINE)
    others = [Submitter(group, item) for item in items]
    for submitter in others:
        submitter.start()
    wait_until(lambda: group.waiting == len(items), f"{len(items)} items to queue")
    writes.release()
    for submitter in [first, *others]:
        submitter.join(DEADLINE)
        assert not submitter.is_alive(), f"{submitter.item} never returned"
    return [first, *others]


def test_an_item_alone_is_written_at_once_in_its_own_group() -> None:
    written: list[list[str]] = []
    group = GroupCommit(lambda items: written.append(list(items)) or [None] * len(items))

    group.submit("a")
    group.submit("b")

    assert written == [["a"], ["b"]]
    assert group.groups == 2
    assert group.waiting == 0


def test_items_queued_during_a_write_are_written_together_in_the_next() -> None:
    writes = HeldWrites()
    group = GroupCommit(writes)

    submitters = held_then(group, writes, ["b", "c", "d"])

    assert all(s.returned and s.error is None for s in submitters)
    assert writes.groups[0] == ["first"]
    assert len(writes.groups) == 2
    assert sorted(writes.groups[1]) == ["b", "c", "d"]


def test_a_group_stops_growing_at_its_weight_and_the_rest_follows() -> None:
    writes = HeldWrites()
    group = GroupCommit(writes, weight=len, max_weight=4)

    submitters = held_then(group, writes, ["bb", "cc", "ddd"])

    assert all(s.error is None for s in submitters)
    assert [sum(map(len, g)) <= 4 for g in writes.groups[1:]] == [True, True]
    assert sorted(item for g in writes.groups[1:] for item in g) == ["bb", "cc", "ddd"]


def test_an_item_heavier_than_a_group_is_written_alone() -> None:
    written: list[list[str]] = []
    group = GroupCommit(lambda items: written.append(list(items)) or [None] * len(items),
                        weight=len, max_weight=2)  # fmt: skip

    group.submit("heavy")

    assert written == [["heavy"]]


def test_a_write_that_fails_fails_every_item_of_its_group_and_only_that_group() -> None:
    def outcome(items: Sequence[str]) -> Sequence[BaseException | None]:
        if "b" in items:
            raise Unavailable("the datastore is unavailable: connection refused")
        return [None] * len(items)

    writes = HeldWrites(outcome)
    group = GroupCommit(writes)

    first, *others = held_then(group, writes, ["b", "c"])

    assert first.error is None
    errors = [s.error for s in others]
    assert [type(e) for e in errors] == [Unavailable, Unavailable]
    assert [str(e) for e in errors] == ["the datastore is unavailable: connection refused"] * 2
    assert errors[0] is not errors[1]  # each thread raises its own, with its own traceback
    group.submit("later")  # the next write is not affected
    assert writes.groups[-1] == ["later"]


def test_each_item_gets_its_own_outcome() -> None:
    def outcome(items: Sequence[str]) -> Sequence[BaseException | None]:
        return [AlreadyExists(f"{item} exists") if item == "c" else None for item in items]

    writes = HeldWrites(outcome)
    group = GroupCommit(writes)

    submitters = held_then(group, writes, ["b", "c", "d"])

    by_item = {s.item: s for s in submitters}
    assert [by_item[i].returned for i in ("first", "b", "c", "d")] == [True, True, False, True]
    error = by_item["c"].error
    assert isinstance(error, AlreadyExists) and error.message == "c exists"


def test_a_commit_returning_the_wrong_number_of_outcomes_fails_the_group() -> None:
    group: GroupCommit[str] = GroupCommit(lambda items: [])

    with pytest.raises(AssertionError, match="a group of 1 items got 0 outcomes"):
        group.submit("a")


def test_an_interrupted_write_hands_the_writing_on() -> None:
    calls: list[list[str]] = []

    def commit(items: Sequence[str]) -> list[Any]:
        calls.append(list(items))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return [None] * len(items)

    group = GroupCommit(commit)
    with pytest.raises(KeyboardInterrupt):
        group.submit("a")

    group.submit("b")  # not stuck behind a write that will never end
    assert calls == [["a"], ["b"]]


# -- coroutines -----------------------------------------------------------------------------


class Writes:
    """A commit function recording each group and the thread that wrote it."""

    def __init__(self, fail: str | None = None) -> None:
        self.groups: list[list[str]] = []
        self.threads: list[str] = []
        self._fail = fail

    def __call__(self, items: Sequence[str]) -> Sequence[BaseException | None]:
        self.groups.append(list(items))
        self.threads.append(threading.current_thread().name)
        return [AlreadyExists(f"{item} exists") if item == self._fail else None
                for item in items]  # fmt: skip


def test_coroutines_submitting_in_one_turn_of_the_loop_are_written_together_off_the_loop(
) -> None:  # fmt: skip
    writes = Writes()
    group = GroupCommit(writes, name="recording")

    async def main() -> None:
        await asyncio.gather(*(group.submit_async(item) for item in ("a", "b", "c")))
        await group.submit_async("d")

    asyncio.run(main())

    assert writes.groups == [["a", "b", "c"], ["d"]]
    assert all(name.startswith("recording") for name in writes.threads)
    assert threading.current_thread().name not in writes.threads


def test_a_coroutine_raises_its_own_item_s_error_only() -> None:
    group = GroupCommit(Writes(fail="b"))

    async def main() -> list[BaseException | None]:
        return await asyncio.gather(
            *(group.submit_async(item) for item in ("a", "b", "c")), return_exceptions=True
        )

    outcomes = asyncio.run(main())

    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], AlreadyExists) and outcomes[1].message == "b exists"


def test_coroutines_queued_behind_a_thread_s_write_are_written_by_the_group_commit_s_thread(
) -> None:  # fmt: skip
    writes = HeldWrites()
    group = GroupCommit(writes, name="recording")
    first = Submitter(group, "first")
    first.start()
    assert writes.entered.wait(DEADLINE)
    outcomes: list[BaseException | None] = []

    async def main() -> None:
        pending = [asyncio.ensure_future(group.submit_async(item)) for item in ("b", "c")]
        await asyncio.sleep(0)  # let both tasks queue their items
        late = Submitter(group, "d")  # a thread queued behind them, in the same group
        late.start()
        wait_until(lambda: group.waiting == 3, "b, c and d to queue")
        writes.release()
        outcomes.extend(await asyncio.gather(*pending, return_exceptions=True))
        late.join(DEADLINE)
        assert late.returned

    asyncio.run(main())
    first.join(DEADLINE)

    assert outcomes == [None, None]
    assert writes.groups[0] == ["first"]
    assert sorted(writes.groups[1]) == ["b", "c", "d"]
    assert writes.threads[1].startswith("recording")  # not the loop's thread, nor d's


def test_a_thread_queued_first_writes_the_next_group_itself_for_coroutines_too() -> None:
    writes = HeldWrites()
    group = GroupCommit(writes, name="recording")
    first = Submitter(group, "first")
    first.start()
    assert writes.entered.wait(DEADLINE)
    second = Submitter(group, "b")
    second.start()
    wait_until(lambda: group.waiting == 1, "b to queue")
    outcomes: list[BaseException | None] = []

    async def main() -> None:
        pending = asyncio.ensure_future(group.submit_async("c"))
        await asyncio.sleep(0)
        wait_until(lambda: group.waiting == 2, "c to queue")
        writes.release()
        outcomes.append(await pending)

    asyncio.run(main())
    for submitter in (first, second):
        submitter.join(DEADLINE)

    assert outcomes == [None]
    assert second.returned and first.returned
    assert writes.groups == [["first"], ["b", "c"]]
    assert writes.threads[1] == "submit-b"


# -- gather: a coroutine's group waits for company -------------------------------------

GATHER = 0.2


class TimedWrites(Writes):
    """Writes, noting when each group was written (time.monotonic)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def __call__(self, items: Sequence[str]) -> Sequence[BaseException | None]:
        self.at.append(time.monotonic())
        return super().__call__(items)


def test_coroutines_submitting_within_the_gather_time_are_written_together() -> None:
    writes = TimedWrites()
    group = GroupCommit(writes, name="recording", gather=GATHER)
    submitted: list[float] = []

    async def main() -> None:
        submitted.append(time.monotonic())
        first = asyncio.ensure_future(group.submit_async("a"))
        for _ in range(5):  # turns of the loop: without gather, "a" would go alone
            await asyncio.sleep(0)
        assert writes.groups == []
        await asyncio.gather(first, group.submit_async("b"), group.submit_async("c"))

    asyncio.run(main())

    assert writes.groups == [["a", "b", "c"]]
    assert writes.at[0] - submitted[0] >= GATHER


def test_a_group_queued_behind_a_write_is_written_gather_after_its_first_item() -> None:
    writes = HeldWrites()
    group = GroupCommit(writes, name="recording", gather=GATHER)
    first = Submitter(group, "first")  # a thread's item: written at once
    first.start()
    assert writes.entered.wait(DEADLINE)
    written: list[float] = []

    async def main() -> None:
        submitted = time.monotonic()
        pending = asyncio.ensure_future(group.submit_async("b"))
        await asyncio.sleep(0)
        wait_until(lambda: group.waiting == 1, "b to queue")
        writes.release()
        await pending
        written.append(time.monotonic() - submitted)

    asyncio.run(main())
    first.join(DEADLINE)

    assert writes.groups == [["first"], ["b"]]
    assert written[0] >= GATHER
    assert writes.threads[1].startswith("recording")


def test_a_thread_s_item_does_not_wait_for_company() -> None:
    writes = Writes()
    group = GroupCommit(writes, gather=60.0)
    group.submit("a")  # returns once written: gather is for coroutines
    assert writes.groups == [["a"]]
