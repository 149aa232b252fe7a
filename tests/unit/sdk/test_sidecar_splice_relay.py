"""``splice``'s relay on real loopback sockets: a client, the two spliced streams, an app."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from sdk.sidecar.config import HostPort
from sdk.sidecar.streams import Stream, splice

DEADLINE_SECONDS = 20
READ_CHUNK = 256 * 1024
"""The most an asyncio socket transport reads at once."""


@dataclass
class Spliced:
    """The client's end, the proxy's accepted stream (counted) and its app stream, the app's end."""

    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    accepted: Stream
    app: Stream
    app_reader: asyncio.StreamReader
    app_writer: asyncio.StreamWriter
    counted: dict[str, int] = field(default_factory=dict)

    def splice(self) -> asyncio.Task[None]:
        return asyncio.create_task(splice(self.accepted, self.app))


async def connected() -> Spliced:
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    at_app: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    proxy_server = await asyncio.start_server(
        lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", 0)  # fmt: skip
    app_server = await asyncio.start_server(lambda r, w: at_app.put_nowait((r, w)), "127.0.0.1", 0)
    client_reader, client_writer = await asyncio.open_connection(
        "127.0.0.1", proxy_server.sockets[0].getsockname()[1])  # fmt: skip
    reader, writer = await accepted.get()
    counted = {"in": 0, "out": 0}

    def count(direction: str) -> Callable[[int], None]:
        def add(size: int) -> None:
            counted[direction] += size

        return add

    stream = Stream(reader, writer, on_read=count("in"), on_write=count("out"))
    app = await Stream.connect(
        HostPort("127.0.0.1", app_server.sockets[0].getsockname()[1]), timeout=5)  # fmt: skip
    app_reader, app_writer = await at_app.get()
    proxy_server.close()
    app_server.close()
    return Spliced(client_reader, client_writer, stream, app, app_reader, app_writer, counted)


def run(test: Callable[[], Awaitable[Any]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(test(), DEADLINE_SECONDS)

    asyncio.run(bounded())


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (the test's deadline bounds it)."""
    while not condition():
        await asyncio.sleep(0)


def test_bytes_pass_both_ways_half_closes_are_passed_on_and_counted() -> None:
    async def scenario() -> None:
        s = await connected()
        spliced = s.splice()
        s.client_writer.write(b"hello ")
        s.client_writer.write(b"world")
        s.client_writer.write_eof()
        assert await s.app_reader.read() == b"hello world"  # up to the passed-on EOF
        s.app_writer.write(b"the answer")  # after the half-close, the other way still works
        s.app_writer.close()
        assert await s.client_reader.read() == b"the answer"
        await spliced
        assert s.counted == {"in": 11, "out": 10}
        await s.accepted.close()
        await s.app.close()

    run(scenario)


def test_bytes_the_reader_held_before_the_splice_go_first() -> None:
    async def scenario() -> None:
        s = await connected()
        s.client_writer.write(b"HEAD\nthe rest of it")  # one segment: the reader gets both
        assert await s.accepted.readuntil(b"\n") == b"HEAD\n"
        spliced = s.splice()
        s.client_writer.write(b", and more")
        s.client_writer.write_eof()
        assert await s.app_reader.read() == b"the rest of it, and more"
        s.app_writer.close()
        await spliced
        assert s.counted == {"in": 29, "out": 0}
        await s.accepted.close()
        await s.app.close()

    run(scenario)


def test_an_eof_the_reader_saw_before_the_splice_is_passed_on() -> None:
    async def scenario() -> None:
        s = await connected()
        s.client_writer.write(b"line\n")
        s.client_writer.write_eof()
        assert await s.accepted.readuntil(b"\n") == b"line\n"
        await until(s.accepted.at_eof)
        spliced = s.splice()
        assert await s.app_reader.read() == b""
        s.app_writer.write(b"late answer")
        s.app_writer.close()
        assert await s.client_reader.read() == b"late answer"
        await spliced
        await s.accepted.close()
        await s.app.close()

    run(scenario)


def test_a_peer_that_does_not_read_pauses_reading_from_the_other_side() -> None:
    async def scenario() -> None:
        s = await connected()
        spliced = s.splice()
        upload = bytes(range(256)) * (128 * 1024)  # 32 MiB, more than the sockets buffer
        s.client_writer.write(upload)
        accepted = s.accepted.writer.transport
        assert isinstance(accepted, asyncio.Transport)
        await until(lambda: not accepted.is_reading())

        towards_app = s.app.writer.transport
        high_water = towards_app.get_write_buffer_limits()[1]
        assert 0 < towards_app.get_write_buffer_size() <= high_water + READ_CHUNK

        assert await s.app_reader.readexactly(len(upload)) == upload
        assert accepted.is_reading()
        await s.client_writer.drain()
        s.client_writer.write_eof()
        assert await s.app_reader.read() == b""
        s.app_writer.close()
        await spliced
        assert s.counted == {"in": len(upload), "out": 0}
        await s.accepted.close()
        await s.app.close()

    run(scenario)


def test_a_lost_connection_ends_the_splice_and_the_streams_close_at_once() -> None:
    async def scenario() -> None:
        s = await connected()
        spliced = s.splice()
        s.client_writer.write(b"ping")
        assert await s.app_reader.readexactly(4) == b"ping"
        linger_zero = struct.pack("ii", 1, 0)  # closing sends a reset, no EOF
        s.client_writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)  # fmt: skip
        s.client_writer.transport.abort()
        await spliced
        await s.app.close()
        assert await s.app_reader.read() == b""
        s.accepted.writer.close()
        # The stream's own protocol hears of the lost connection: nothing waits for a timeout.
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(s.accepted.writer.wait_closed(), DEADLINE_SECONDS / 2)
        assert s.counted == {"in": 4, "out": 0}

    run(scenario)


def test_a_stream_with_bytes_still_buffered_is_spliced_by_the_relay() -> None:
    """A TLS client's transport often still holds its last handshake flight when the splice
    starts: that must not send the splice to the slower per-direction pumps."""

    async def scenario() -> None:
        s = await connected()
        towards_app = s.app.writer.transport
        app_protocol = towards_app.get_protocol()
        towards_app.set_write_buffer_limits(high=256 * 1024 * 1024)
        backlog = b"x" * (32 * 1024 * 1024)  # more than the kernel buffers while the app waits
        s.app.write(backlog)
        assert 0 < towards_app.get_write_buffer_size() < 256 * 1024 * 1024  # not paused
        spliced = s.splice()
        s.client_writer.write(b"after")
        s.client_writer.write_eof()
        assert await s.app_reader.read() == backlog + b"after"
        s.app_writer.close()
        await spliced
        assert towards_app.get_protocol() is not app_protocol  # the relay took the transport
        assert s.counted["in"] == 5
        await s.accepted.close()
        await s.app.close()

    run(scenario)
