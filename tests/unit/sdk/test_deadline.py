"""A connection's deadline: each wait limited, one timer for all of them, on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from sdk.sidecar.deadline import Deadline

FakeClockTest = Callable[[asyncio.AbstractEventLoop, list[float]], Coroutine[Any, Any, None]]


def run_on_fake_clock(test: FakeClockTest) -> None:
    """Run ``test`` on asyncio's loop whose clock is ``now[0]``, moved only by the test."""
    loop = asyncio.new_event_loop()
    now = [1000.0]
    loop.time = lambda: now[0]  # type: ignore[method-assign]
    try:
        loop.run_until_complete(test(loop, now))
    finally:
        loop.close()


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_wait_past_its_limit_is_a_timeout() -> None:
    async def test(loop: asyncio.AbstractEventLoop, now: list[float]) -> None:
        deadline = Deadline(5.0)
        never = loop.create_future()
        waiting = asyncio.ensure_future(deadline.wait(never))
        await _turns()
        now[0] += 4.9
        await _turns()
        assert not waiting.done()
        now[0] += 0.2
        await _turns()
        with pytest.raises(TimeoutError):
            await waiting
        assert never.cancelled()
        deadline.cancel()

    run_on_fake_clock(test)


def test_many_waits_share_one_timer_and_each_gets_the_whole_limit() -> None:
    async def test(loop: asyncio.AbstractEventLoop, now: list[float]) -> None:
        timers = 0
        call_at = loop.call_at

        def counting(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            nonlocal timers
            timers += 1
            return call_at(when, callback, *args)

        loop.call_at = counting  # type: ignore[method-assign]
        deadline = Deadline(5.0)
        for _ in range(100):
            now[0] += 0.01
            assert await deadline.wait(asyncio.sleep(0, "answer")) == "answer"
        assert timers == 1
        # The timer fires at its first due time, finds a later wait in progress and moves on.
        now[0] += 3.0
        slow = loop.create_future()
        waiting = asyncio.ensure_future(deadline.wait(slow))
        await _turns()
        now[0] += 4.0  # past the first due time, within this wait's limit
        await _turns()
        assert not waiting.done() and timers == 2
        slow.set_result("late but in time")
        assert await waiting == "late but in time"
        deadline.cancel()

    run_on_fake_clock(test)


def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def test(loop: asyncio.AbstractEventLoop, now: list[float]) -> None:
        deadline = Deadline(5.0)
        waiting = asyncio.ensure_future(deadline.wait(loop.create_future()))
        await _turns()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # The deadline is still good for the next wait, and times it out on its own.
        again = asyncio.ensure_future(deadline.wait(loop.create_future()))
        await _turns()
        now[0] += 6.0
        await _turns()
        with pytest.raises(TimeoutError):
            await again
        deadline.cancel()

    run_on_fake_clock(test)
