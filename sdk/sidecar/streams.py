"""The two ends of a proxied connection, and splicing them together.

::

    client = Stream(reader, writer, on_read=received.inc, on_write=sent.inc)
    app = await Stream.connect(HostPort("127.0.0.1", 8080), timeout=5)
    await splice(client, app)          # both directions, half-closes passed on where possible
    await app.close()

A :class:`Stream` counts the bytes it reads and writes (for the proxy's
metrics) and is what :mod:`sdk.sidecar.http` reads from and writes to.

:func:`splice` is the proxy's data path. Rather than a coroutine per
direction reading a chunk and writing it (a task wake-up, several Python
frames and a drain per chunk), it puts a small protocol on each transport
that writes what arrives straight to the other one, in the event loop's own
callback: one ``write`` per chunk received. Backpressure is the transports'
own: when one end's write buffer passes its high-water mark, reading from
the other end pauses until it has drained. The bytes spliced are added up in
plain integers and handed to the streams' counters every
:data:`COUNT_INTERVAL_SECONDS` and when the splice ends (a metrics counter's
``inc`` per chunk cost more than the rest of the Python work per chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any, Final, cast

from sdk.address import HostPort

__all__ = ["BufferedReader", "Stream", "splice"]

STREAM_LIMIT: Final = 64 * 1024
"""The longest line a reader buffers while looking for its end."""
CLOSE_TIMEOUT_SECONDS: Final = 1.0
COPY_BUFFER: Final = 64 * 1024
COUNT_INTERVAL_SECONDS: Final = 1.0
"""How often a splice hands the bytes it relayed to the streams' counters."""


def _ignore(_: int) -> None:
    return None


class BufferedReader:
    """Bytes from an ``asyncio.StreamReader`` through a buffer of its own, counted as read.

    The buffer (:attr:`buffer`) is what a message head is looked for in, whole:
    :meth:`fill` waits for the next bytes to arrive and :meth:`take` consumes what
    was found, so that reading a head costs one wait per arrival rather than one
    ``readuntil`` per line. Everything read goes through the buffer first
    (:meth:`readuntil`, :meth:`readexactly`, :meth:`read` take from it before
    waiting), so bytes beyond a head stay for the next read.
    """

    def __init__(
        self, reader: asyncio.StreamReader, *, on_read: Callable[[int], Any] = _ignore
    ) -> None:
        self.reader = reader
        self.buffer = bytearray()
        """Received and not yet read; look, but consume only through :meth:`take`."""
        self._on_read = on_read
        self.bytes_read = 0
        """Bytes read through :meth:`take`, :meth:`readuntil`, :meth:`readexactly` and
        :meth:`read`."""

    async def fill(self) -> bool:
        """Wait for more bytes and append them to :attr:`buffer`; False at the end of the
        stream (nothing appended)."""
        data = await self.reader.read(STREAM_LIMIT)
        if not data:
            return False
        self.buffer += data
        return True

    def take(self, n: int) -> bytes:
        """The first ``n`` bytes of :attr:`buffer` (fewer if it holds fewer), consumed."""
        buffer = self.buffer
        if n >= len(buffer):
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:n])
            del buffer[:n]
        self.bytes_read += len(data)
        self._on_read(len(data))
        return data

    def take_buffered(self, n: int) -> bytes | None:
        """The next ``n`` bytes if they have already arrived (consumed), else None (nothing
        consumed): no wait."""
        return self.take(n) if len(self.buffer) >= n else None

    async def readuntil(self, separator: bytes) -> bytes:
        """As ``asyncio.StreamReader.readuntil``: up to and with ``separator``;
        ``LimitOverrunError`` past :data:`STREAM_LIMIT` bytes, ``IncompleteReadError`` at
        the end of the stream."""
        buffer = self.buffer
        start = 0
        while (found := buffer.find(separator, start)) < 0:
            if len(buffer) > STREAM_LIMIT:
                raise asyncio.LimitOverrunError("the separator was not found in time", start)
            start = max(0, len(buffer) - len(separator) + 1)
            if not await self.fill():
                raise asyncio.IncompleteReadError(self.take(len(buffer)), None)
        if found > STREAM_LIMIT:
            raise asyncio.LimitOverrunError("the separator was found too far", found)
        return self.take(found + len(separator))

    async def readexactly(self, n: int) -> bytes:
        """As ``asyncio.StreamReader.readexactly``."""
        while len(self.buffer) < n:
            if not await self.fill():
                raise asyncio.IncompleteReadError(self.take(len(self.buffer)), n)
        return self.take(n)

    async def read(self, n: int = -1) -> bytes:
        """As ``asyncio.StreamReader.read``: what has arrived, up to ``n`` bytes (``-1``:
        everything until the end); ``b""`` at the end."""
        if n < 0:
            while await self.fill():
                pass
            return self.take(len(self.buffer))
        if self.buffer:
            return self.take(n)
        data = await self.reader.read(n)
        self.bytes_read += len(data)
        self._on_read(len(data))
        return data

    def count_reads(self, on_read: Callable[[int], Any]) -> None:
        """Call ``on_read`` with the size of everything read from now on."""
        self._on_read = on_read

    def at_eof(self) -> bool:
        return not self.buffer and self.reader.at_eof()


class Stream(BufferedReader):
    """A reader and writer pair that counts the bytes through it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_read: Callable[[int], Any] = _ignore,
        on_write: Callable[[int], Any] = _ignore,
    ) -> None:
        super().__init__(reader, on_read=on_read)
        self.writer = writer
        self._on_write = on_write
        self.bytes_written = 0
        """Bytes written through :meth:`write`."""

    @classmethod
    async def connect(cls, address: HostPort, *, timeout: float) -> Stream:
        """A plain TCP connection to ``address``; OSError or TimeoutError if it cannot be made."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address.host, address.port, limit=STREAM_LIMIT), timeout
        )
        return cls(reader, writer)

    @functools.cached_property
    def peer(self) -> str:
        """``host:port`` of the other end, for log lines."""
        name = self.writer.get_extra_info("peername")
        if isinstance(name, tuple) and len(name) >= 2:
            host = f"[{name[0]}]" if ":" in str(name[0]) else str(name[0])
            return f"{host}:{name[1]}"
        return "unknown"

    def write(self, data: bytes) -> None:
        self.bytes_written += len(data)
        self._on_write(len(data))
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def can_write_eof(self) -> bool:
        return self.writer.can_write_eof()

    def write_eof(self) -> None:
        self.writer.write_eof()

    async def close(self) -> None:
        """Close (with TLS, send close_notify), waiting a moment for it to go out."""
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self.writer.wait_closed()


async def splice(a: Stream, b: Stream) -> Stream | None:
    """Copy ``a`` to ``b`` and ``b`` to ``a`` until both ended; the stream that ended first.

    When one direction ends, the other side is half-closed if it can be
    (plain TCP) and the other direction goes on; where it cannot (TLS has no
    half-close), or when either connection is lost, both directions stop.
    Afterwards the streams are only good for :meth:`Stream.close`.
    """
    for stream in (a, b):
        if stream.writer.transport.get_write_buffer_size():
            try:
                # So neither transport is paused for writing (its protocol is about to change).
                # Bytes may stay buffered: a TLS client's last handshake flight often does.
                await stream.drain()
            except OSError:
                return stream
    transport_a, transport_b = _transport_to_take(a), _transport_to_take(b)
    if transport_a is None or transport_b is None:
        return await _splice_with_pumps(a, b)
    # What the readers already hold (no wait: only read when there is some).
    held_a, held_b = await _read_buffered(a), await _read_buffered(b)
    relay = _Relay(_End(a, transport_a, held_a), _End(b, transport_b, held_b))
    try:
        while not relay.finished.done():
            await asyncio.wait((relay.finished,), timeout=COUNT_INTERVAL_SECONDS)
            relay.count()
    finally:
        relay.finish()
        relay.count()
    return relay.ended_first


class _End(asyncio.Protocol):
    """One stream's transport while it is spliced: what arrives goes to the other end."""

    relay: _Relay
    peer: _End

    def __init__(self, stream: Stream, transport: asyncio.Transport, buffered: bytes) -> None:
        self.stream = stream
        self.transport = transport
        self.buffered = buffered
        """What the stream's reader had received before the splice."""
        self.previous = transport.get_protocol()
        """The stream's own protocol, told when the connection is lost (``wait_closed``)."""
        self.ended = False
        """This end sent its EOF, and it was passed on."""
        self.received = 0
        """Bytes read from this end and not yet counted (:meth:`_Relay.count`)."""

    def data_received(self, data: bytes) -> None:
        if self.relay.over:
            return  # the splice has ended: the streams are being closed
        self.received += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        # Plain TCP stays open for the other direction; TLS closes after its close_notify,
        # so then nothing can go the other way either.
        keep_open = self.transport.can_write_eof()
        if self.relay.over:
            return keep_open
        self.ended = True
        self.relay.ending(self)
        target = self.peer.transport
        if keep_open and target.can_write_eof() and not target.is_closing():
            target.write_eof()
            if self.peer.ended:
                self.relay.finish()
        else:
            self.relay.finish()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.previous.connection_lost(exc)
        self.relay.ending(self)
        self.relay.finish()

    def pause_writing(self) -> None:
        """This end's write buffer is full: stop reading from the peer until it drained."""
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class _Relay:
    """Two :class:`_End` put on their transports; ``finished`` is done when it is over.

    What the streams' readers held goes first, and an EOF they had seen is
    passed on.
    """

    def __init__(self, a: _End, b: _End) -> None:
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.over = False
        self.ended_first: Stream | None = None
        """The stream whose end (EOF or lost connection) came first."""
        self.ends = (a, b)
        a.relay = b.relay = self
        a.peer, b.peer = b, a
        for end in (a, b):
            end.transport.set_protocol(end)
        for end in (a, b):
            if end.buffered:
                end.data_received(end.buffered)
                end.buffered = b""
        for end in (a, b):
            if end.stream.reader.at_eof():
                end.eof_received()

    def ending(self, end: _End) -> None:
        if self.ended_first is None and not self.over:
            self.ended_first = end.stream

    def count(self) -> None:
        """Hand the bytes relayed since the last call to the streams' counters."""
        for end in self.ends:
            if size := end.received:
                end.received = 0
                end.stream._on_read(size)
                end.peer.stream._on_write(size)

    def finish(self) -> None:
        self.over = True
        if not self.finished.done():
            self.finished.set_result(None)


# What splicing calls on a transport; checked by name, as uvloop's transports do not
# derive from asyncio's classes.
_SPLICED_TRANSPORT_METHODS: Final = (
    "get_protocol", "set_protocol", "pause_reading", "resume_reading", "write",
    "is_closing", "get_write_buffer_size", "can_write_eof", "write_eof",
)


def _transport_to_take(stream: Stream) -> asyncio.Transport | None:
    """``stream``'s transport if it is open and its reader's buffer can be taken."""
    transport = stream.writer.transport
    if (
        all(hasattr(transport, method) for method in _SPLICED_TRANSPORT_METHODS)
        and not transport.is_closing()
        and stream.reader.exception() is None
        and isinstance(getattr(stream.reader, "_buffer", None), bytearray)
    ):
        return cast(asyncio.Transport, transport)
    return None


async def _read_buffered(stream: Stream) -> bytes:
    """What ``stream`` and its reader hold, without waiting for more (not counted here: the
    splice counts it as it relays it)."""
    held = bytes(stream.buffer)
    stream.buffer.clear()
    buffer: bytearray = getattr(stream.reader, "_buffer")  # noqa: B009
    return held + await stream.reader.read(len(buffer)) if buffer else held


async def _splice_with_pumps(a: Stream, b: Stream) -> Stream | None:
    """:func:`splice` through the streams' readers and writers, a task per direction."""
    sources = {asyncio.create_task(_pump(a, b)): a, asyncio.create_task(_pump(b, a)): b}
    pumps = set(sources)
    ended_first: Stream | None = None
    try:
        while pumps:
            done, pumps = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if ended_first is None:
                ended_first = sources[next(iter(done))]
            if not all(task.result() for task in done):
                break
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    return ended_first


async def _pump(source: Stream, target: Stream) -> bool:
    """Copy until the source ends; True if the end was passed on as a half-close."""
    try:
        while data := await source.read(COPY_BUFFER):
            target.write(data)
            await target.drain()
        if not target.can_write_eof():
            return False
        target.write_eof()
    except OSError:
        return False
    return True
