"""Which event loop the long-running processes run on."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from sdk import eventloop
from sdk.errors import ConfigError


async def running_loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.run(running_loop_type()) is uvloop.Loop


def test_a_process_may_default_to_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    loop_type = eventloop.run(running_loop_type(), default="asyncio")
    assert issubclass(loop_type, asyncio.BaseEventLoop)
    assert loop_type is not uvloop.Loop


@pytest.mark.parametrize("default", ["uvloop", "asyncio"])
def test_the_environment_overrides_the_default(
    monkeypatch: pytest.MonkeyPatch, default: eventloop.Loop
) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.run(running_loop_type(), default=default) is not uvloop.Loop
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    assert eventloop.run(running_loop_type(), default=default) is uvloop.Loop


def test_an_unknown_choice_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "trio")
    with pytest.raises(ConfigError) as raised:
        eventloop.run(running_loop_type())
    assert str(raised.value) == "TESSERA_EVENT_LOOP must be auto, uvloop or asyncio, not 'trio'"
