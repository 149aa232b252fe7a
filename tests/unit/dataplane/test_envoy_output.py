"""Envoy's output into Tessera's log: levels, continued lines, long lines, its last words."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dataplane.envoy.output import EnvoyOutput

# What Envoy 1.40 writes when a static listener cannot bind, with --log-format '%l|%n|%v'.
BIND_FAILURE = [
    "warning|main|There is no configured limit to the number of allowed active downstream "
    "connections.",
    "error|config|listener 'edge' failed to bind or apply socket options: cannot bind "
    "'127.0.0.1:18090': Address already in use",
    "critical|main|error `cannot bind '127.0.0.1:18090': Address already in use` initializing "
    "config 'goo.gle/debugonly  ",
    "  /run/tessera/envoy/bootstrap.json'",
    "cannot bind '127.0.0.1:18090': Address already in use",
]


def feed(output: EnvoyOutput, lines: list[str] | bytes, *, limit: int = 8192) -> None:
    data = lines if isinstance(lines, bytes) else "".join(f"{line}\n" for line in lines).encode()

    async def follow() -> None:
        reader = asyncio.StreamReader(limit=limit)
        reader.feed_data(data)
        reader.feed_eof()
        await output.follow(reader)

    asyncio.run(follow())


def test_each_line_is_logged_at_envoys_level_with_the_prefix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tessera.envoy")
    output = EnvoyOutput(prefix="envoy users")

    feed(output, BIND_FAILURE)

    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "envoy users: [main] There is no configured limit to the number of "
                          "allowed active downstream connections."),
        (logging.ERROR, "envoy users: [config] listener 'edge' failed to bind or apply socket "
                        "options: cannot bind '127.0.0.1:18090': Address already in use"),
        (logging.CRITICAL, "envoy users: [main] error `cannot bind '127.0.0.1:18090': Address "
                           "already in use` initializing config 'goo.gle/debugonly  "),
        (logging.CRITICAL, "envoy users: [main] /run/tessera/envoy/bootstrap.json'"),
        (logging.INFO, "envoy users: cannot bind '127.0.0.1:18090': Address already in use"),
    ]  # fmt: skip


def test_last_words_are_what_envoy_could_not_do_at_start() -> None:
    output = EnvoyOutput()
    feed(output, BIND_FAILURE)

    assert output.last_words() == "cannot bind '127.0.0.1:18090': Address already in use"


def test_last_words_are_the_last_error_else_nothing() -> None:
    output = EnvoyOutput()
    feed(output, ["info|main|starting", "error|upstream|DNS resolution failed",
                  "warning|main|caught ENVOY_SIGTERM"])  # fmt: skip
    assert output.last_words() == "DNS resolution failed"

    quiet = EnvoyOutput()
    feed(quiet, ["warning|main|There is no configured limit"])
    assert quiet.last_words() == ""


def test_a_line_too_long_is_cut_and_the_next_one_read(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tessera.envoy")
    output = EnvoyOutput(max_line=40)

    feed(output, b"info|main|" + b"x" * 200 + b"\ninfo|main|next\nlast without newline",
         limit=64)

    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "envoy: [main] " + "x" * 30 + " [cut]",
        "envoy: [main] next",
        "envoy: last without newline",
    ]


def test_warnings_while_envoy_is_stopped_are_what_stopping_looks_like(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tessera.envoy")
    output = EnvoyOutput()
    output.stopping = True

    feed(output, ["warning|main|caught ENVOY_SIGTERM", "error|config|cannot write"])

    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "envoy: [main] caught ENVOY_SIGTERM"),
        (logging.ERROR, "envoy: [config] cannot write"),
    ]
