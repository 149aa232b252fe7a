"""A client of Envoy's admin interface, for the supervisor, ``describe`` and tests.

    admin = EnvoyAdmin.unix(work_dir / "admin.sock")     # or EnvoyAdmin.tcp(HostPort(...))
    await admin.server_state()          # 'LIVE', 'PRE_INITIALIZING', 'INITIALIZING', 'DRAINING'
    await admin.listeners()             # {'inbound': '127.0.0.1:15006', ...}: the active ones
    await admin.stats(r"^listener_manager\\.")    # {'listener_manager.total_listeners_active': 2}
    await admin.config_dump("dynamic_listeners")  # the JSON Envoy answers, as a dict
    await admin.clusters()              # /clusters?format=json, as a dict
    await admin.prometheus_stats()      # /stats/prometheus, bytes in the Prometheus text format
    await admin.drain_listeners()       # POST /drain_listeners?graceful

One request per connection (``Connection: close``), each bounded in time (``timeout``
seconds, connecting included) and in size (``max_bytes`` of body; a longer answer is an
error, never silently cut). Every failure is an
:class:`~dataplane.envoy.errors.EnvoyAdminError` naming the request and why. The
admin interface listens on a Unix socket in the supervisor's private directory, or on
loopback; this client speaks just enough HTTP/1.1 for what Envoy answers there
(a ``Content-Length`` or chunked body, or one that ends with the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from dataplane.envoy.errors import EnvoyAdminError
from sdk.address import HostPort
from sdk.sidecar.errors import HttpError
from sdk.sidecar.http import BodyKind, read_response_head
from sdk.sidecar.streams import BufferedReader

__all__ = ["AdminResponse", "EnvoyAdmin"]

TIMEOUT_SECONDS: Final = 2.0
"""How long one admin request may take, connecting included."""
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
"""The largest answer read (a config dump of a large mesh fits); longer is an error."""
_READ_SIZE: Final = 64 * 1024
_MAX_CHUNK_LINE: Final = 1024

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass(frozen=True)
class AdminResponse:
    status: int
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class EnvoyAdmin:
    """Envoy's admin interface at one address; every call bounded by ``timeout`` seconds
    and ``max_bytes`` of answer."""

    def __init__(
        self,
        connect: Connect,
        address: str,
        *,
        timeout: float = TIMEOUT_SECONDS,
        max_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._connect = connect
        self.address = address
        """Where it listens, for messages: ``unix:/path`` or ``127.0.0.1:PORT``."""
        self.timeout = timeout
        self.max_bytes = max_bytes

    @classmethod
    def unix(cls, path: Path, **bounds: Any) -> EnvoyAdmin:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_unix_connection(path, limit=_READ_SIZE)

        return cls(connect, f"unix:{path}", **bounds)

    @classmethod
    def tcp(cls, address: HostPort, **bounds: Any) -> EnvoyAdmin:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection(address.host, address.port, limit=_READ_SIZE)

        return cls(connect, str(address), **bounds)

    def bounded(self, *, timeout: float, max_bytes: int) -> EnvoyAdmin:
        """The same admin interface, with other bounds."""
        return EnvoyAdmin(self._connect, self.address, timeout=timeout, max_bytes=max_bytes)

    def __repr__(self) -> str:
        return f"EnvoyAdmin({self.address!r})"

    # -- what Envoy says ------------------------------------------------------------------

    async def server_state(self) -> str:
        """``/ready``: LIVE when Envoy serves with its whole initial configuration, else
        PRE_INITIALIZING, INITIALIZING or DRAINING (Envoy answers 503 with those)."""
        response = await self.request("GET", "/ready", ok=(200, 503))
        return response.text().strip()

    async def listeners(self) -> dict[str, str]:
        """The active listeners (warming ones are not among them), by name, with the
        address each listens on."""
        document = await self.get_json("/listeners?format=json")
        listeners: dict[str, str] = {}
        for status in _list(document.get("listener_statuses")):
            if isinstance(status, dict) and isinstance(status.get("name"), str):
                listeners[status["name"]] = _address(status.get("local_address"))
        return listeners

    async def stats(self, pattern: str | None = None) -> dict[str, int | float | str]:
        """Counters, gauges and text stats (not histograms) whose name matches the regular
        expression ``pattern`` (Envoy's own ``filter``), by name."""
        target = "/stats?format=json"
        if pattern is not None:
            target += f"&filter={quote(pattern, safe='')}"
        document = await self.get_json(target)
        stats: dict[str, int | float | str] = {}
        for stat in _list(document.get("stats")):
            if isinstance(stat, dict) and isinstance(stat.get("name"), str):
                value = stat.get("value")
                if isinstance(value, int | float | str):
                    stats[stat["name"]] = value
        return stats

    async def config_dump(
        self, resource: str | None = None, *, include_eds: bool = False
    ) -> dict[str, Any]:
        """``/config_dump``, or only ``resource`` of it (``dynamic_listeners``,
        ``dynamic_active_clusters``, ...); secrets come redacted, as Envoy dumps them."""
        query = []
        if resource is not None:
            query.append(f"resource={quote(resource, safe='')}")
        if include_eds:
            query.append("include_eds")
        return await self.get_json("/config_dump" + ("?" + "&".join(query) if query else ""))

    async def clusters(self) -> dict[str, Any]:
        """``/clusters?format=json``: each cluster's hosts, their health and counters."""
        return await self.get_json("/clusters?format=json")

    async def server_info(self) -> dict[str, Any]:
        """``/server_info``: version, state, uptime, the command line options."""
        return await self.get_json("/server_info")

    async def prometheus_stats(self, *, used_only: bool = False) -> bytes:
        """``/stats/prometheus``: every stat in the Prometheus text format (with
        ``used_only``, only those that were ever written)."""
        target = "/stats/prometheus" + ("?usedonly" if used_only else "")
        return (await self.request("GET", target)).body

    async def drain_listeners(self, *, graceful: bool = True) -> None:
        """Start draining every listener. ``graceful``: for the drain time Envoy was started
        with (``--drain-time-s``) it still accepts, asking callers to close their
        connections, then stops listening; else it stops listening at once. Connections
        open when it stops listening go on until they end."""
        await self.request("POST", "/drain_listeners" + ("?graceful" if graceful else ""))

    # -- the exchange ---------------------------------------------------------------------

    async def get_json(self, target: str) -> dict[str, Any]:
        response = await self.request("GET", target)
        try:
            document = json.loads(response.body)
        except ValueError as err:
            raise EnvoyAdminError(
                f"Envoy's admin ({self.address}) answered GET {target} with something other "
                f"than JSON: {err}"
            ) from err
        if not isinstance(document, dict):
            raise EnvoyAdminError(
                f"Envoy's admin ({self.address}) answered GET {target} with JSON that is not "
                "an object"
            )
        return document

    async def request(
        self, method: str, target: str, *, ok: tuple[int, ...] = (200,)
    ) -> AdminResponse:
        """One request; EnvoyAdminError unless the status is one of ``ok``."""
        what = f"{method} {target}"
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._exchange(method, target)
        except TimeoutError as err:
            raise EnvoyAdminError(
                f"Envoy's admin ({self.address}) did not answer {what} within "
                f"{self.timeout:g} s"
            ) from err
        except OSError as err:
            raise EnvoyAdminError(
                f"cannot reach Envoy's admin ({self.address}) for {what}: "
                f"{err.strerror or err}"
            ) from err
        except HttpError as err:
            raise EnvoyAdminError(
                f"Envoy's admin ({self.address}) answered {what} with a malformed response "
                f"({err.message.replace('the app', 'it')})"
            ) from err
        if response.status not in ok:
            detail = " ".join(response.text().split())[:300]
            raise EnvoyAdminError(
                f"Envoy's admin ({self.address}) answered {what} with {response.status}"
                + (f": {detail}" if detail else "")
            )
        return response

    async def _exchange(self, method: str, target: str) -> AdminResponse:
        reader, writer = await self._connect()
        try:
            writer.write(
                f"{method} {target} HTTP/1.1\r\nHost: envoy-admin\r\nConnection: close\r\n"
                f"Content-Length: 0\r\n\r\n".encode("ascii")
            )
            await writer.drain()
            stream = BufferedReader(reader)
            head = await read_response_head(stream, method)
            if head.body.kind is BodyKind.NONE:
                body = b""
            elif head.body.kind is BodyKind.LENGTH:
                body = await self._read_exactly(stream, head.body.length)
            elif head.body.kind is BodyKind.CHUNKED:
                body = await self._read_chunked(stream)
            else:
                body = await self._read_to_end(stream)
            return AdminResponse(head.status, body)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _too_large(self) -> EnvoyAdminError:
        return EnvoyAdminError(
            f"Envoy's admin ({self.address}) answered with more than {self.max_bytes} bytes, "
            "the most this client reads"
        )

    async def _read_exactly(self, reader: BufferedReader, length: int) -> bytes:
        if length > self.max_bytes:
            raise self._too_large()
        try:
            return await reader.readexactly(length)
        except asyncio.IncompleteReadError as err:
            raise HttpError(502, "the body ended before its Content-Length") from err

    async def _read_to_end(self, reader: BufferedReader) -> bytes:
        body = bytearray()
        while data := await reader.read(_READ_SIZE):
            body += data
            if len(body) > self.max_bytes:
                raise self._too_large()
        return bytes(body)

    async def _read_chunked(self, reader: BufferedReader) -> bytes:
        body = bytearray()
        while True:
            line = await _read_line(reader)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError(502, "a chunk size is not a hexadecimal number") from None
            if size == 0:
                break
            if len(body) + size > self.max_bytes:
                raise self._too_large()
            body += await self._read_exactly(reader, size)
            if await _read_line(reader) != b"":
                raise HttpError(502, "a chunk's data is not followed by CRLF")
        while await _read_line(reader):  # trailer fields, unused
            pass
        return bytes(body)


async def _read_line(reader: BufferedReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as err:
        raise HttpError(502, "the connection closed inside a chunked body") from err
    except asyncio.LimitOverrunError as err:
        raise HttpError(502, "a chunk line is too long") from err
    if len(line) > _MAX_CHUNK_LINE:
        raise HttpError(502, "a chunk line is too long")
    return line.rstrip(b"\r\n")


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _address(value: object) -> str:
    """``127.0.0.1:8080`` or ``unix:/path`` from an Envoy ``Address`` in JSON."""
    if not isinstance(value, dict):
        return ""
    socket = value.get("socket_address")
    if isinstance(socket, dict):
        host = str(socket.get("address", ""))
        port = socket.get("port_value", 0)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    pipe = value.get("pipe")
    if isinstance(pipe, dict):
        return f"unix:{pipe.get('path', '')}"
    return ""
