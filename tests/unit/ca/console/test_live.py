"""Following the server's changes through an outage (the admin API here is a scripted
stand-in: the real one is exercised in tests/integration/test_console.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from ca.console.live import REACHABLE, UNREACHABLE, Changes
from ca.console.sources import SourceError


class ScriptedAdmin:
    """Answers ``/v1/watch`` from a script: a dict is an answer, an exception is raised."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.asked: list[dict[str, Any]] = []
        self.done = asyncio.Event()

    async def get(self, path: str, params: dict[str, Any], *, timeout: float) -> Any:
        assert path == "/v1/watch"
        self.asked.append(params)
        if not self.script:
            self.done.set()
            await asyncio.Event().wait()
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def test_an_outage_is_told_and_the_return_is_noticed_at_once() -> None:
    asyncio.run(_outage())


async def _outage() -> None:
    admin = ScriptedAdmin([
        {"token": "a", "changed": []},
        SourceError("cannot reach the server's admin socket"),
        SourceError("cannot reach the server's admin socket"),
        {"token": "b", "changed": []},
    ])
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    changes = Changes(admin, metrics_interval=None, sleep=sleep)  # type: ignore[arg-type]
    told: list[list[str]] = []
    changes.listeners.append(told.append)
    changes.start()
    try:
        await asyncio.wait_for(admin.done.wait(), 5)
    finally:
        await changes.stop()
    # Told once that the server went away, once that it is back (with a catch-up).
    assert told == [[UNREACHABLE], [REACHABLE, "entries", "bundle", "agents", "mesh"]]
    assert changes.problem is None and changes.token == "b"
    # While it is away and on the first ask after, nothing waits on the server's side.
    assert [a["timeout"] for a in admin.asked] == [None, 25, None, None, 25]
    assert slept == [2.0, 2.0]
