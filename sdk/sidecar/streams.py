"""The two ends of a proxied connection, and splicing them together.

::

    client = Stream(reader, writer, on_read=received.inc, on_write=sent.inc)
    app = await Stream.connect(HostPort("127.0.0.1", 8080), timeout=5)
    await splice(client, app)          # both directions, half-closes passed on where possible
    await app.close()

A :class:`Stream` counts the bytes it reads and writes (for the proxy's
metrics) and is what :mod:`sdk.sidecar.http` reads from and writes to.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Final

from sdk.sidecar.config import HostPort

__all__ = ["Stream", "splice"]

STREAM_LIMIT: Final = 64 * 1024
"""The longest line a reader buffers while looking for its end."""
CLOSE_TIMEOUT_SECONDS: Final = 1.0
COPY_BUFFER: Final = 64 * 1024


def _ignore(_: int) -> None:
    return None


class Stream:
    """A reader and writer pair that counts the bytes through it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_read: Callable[[int], Any] = _ignore,
        on_write: Callable[[int], Any] = _ignore,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._on_read = on_read
        self._on_write = on_write

    @classmethod
    async def connect(cls, address: HostPort, *, timeout: float) -> Stream:
        """A plain TCP connection to ``address``; OSError or TimeoutError if it cannot be made."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address.host, address.port, limit=STREAM_LIMIT), timeout
        )
        return cls(reader, writer)

    @property
    def peer(self) -> str:
        """``host:port`` of the other end, for log lines."""
        name = self.writer.get_extra_info("peername")
        if isinstance(name, tuple) and len(name) >= 2:
            host = f"[{name[0]}]" if ":" in str(name[0]) else str(name[0])
            return f"{host}:{name[1]}"
        return "unknown"

    async def readuntil(self, separator: bytes) -> bytes:
        data = await self.reader.readuntil(separator)
        self._on_read(len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self._on_read(len(data))
        return data

    async def read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        self._on_read(len(data))
        return data

    def at_eof(self) -> bool:
        return self.reader.at_eof()

    def write(self, data: bytes) -> None:
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
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT_SECONDS)


async def splice(a: Stream, b: Stream) -> None:
    """Copy ``a`` to ``b`` and ``b`` to ``a`` until both ended.

    When one direction ends, the other side is half-closed if it can be
    (plain TCP) and the other direction goes on; where it cannot (TLS has no
    half-close), or on an error, both directions stop.
    """
    pumps = {asyncio.create_task(_pump(a, b)), asyncio.create_task(_pump(b, a))}
    try:
        while pumps:
            done, pumps = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if not all(task.result() for task in done):
                break
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


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
