"""A sidecar's health endpoints and metrics, on ``health_bind`` / ``--health-bind``.

    GET /live      200 {"status": "live"} while the sidecar runs
    GET /ready     200 {"status": "ready"}, or 503 {"status": "not ready", "reason": ...}
    GET /metrics   Prometheus text (sdk.sidecar.metrics), then ``more_metrics()``'s

    server = HealthServer(HostPort("127.0.0.1", 8090), metrics, ready=lambda: None)
    await server.start()          # SidecarConfigError if the port is taken
    ...
    await server.stop()

The same shape as the agent's (``workload_api.health``), served by the
sidecar's own HTTP/1.1 reader rather than a web framework, from the
sidecar's event loop, and with the sidecar's metrics only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST

from sdk.address import HostPort
from sdk.sidecar.errors import HttpError, SidecarConfigError
from sdk.sidecar.http import read_request_head, simple_response
from sdk.sidecar.metrics import SvidMetrics
from sdk.sidecar.streams import Stream

__all__ = ["HealthServer"]

_log = logging.getLogger("tessera.sidecar")

REQUEST_TIMEOUT_SECONDS: Final = 10.0


class HealthServer:
    def __init__(
        self,
        bind: HostPort,
        metrics: SvidMetrics,
        *,
        ready: Callable[[], str | None],
        more_metrics: Callable[[], Awaitable[bytes]] | None = None,
        setting: str = "--health-bind",
    ) -> None:
        """``more_metrics``: more Prometheus text for ``/metrics`` (a proxy's own stats,
        bounded in time and size by the callee), served after the sidecar's. ``setting``
        is what the user gave ``bind`` with (a flag, or a config file's key): the error
        when the address is taken names it."""
        self.bind = bind
        self._setting = setting
        self._metrics = metrics
        self._ready = ready
        self._more_metrics = more_metrics
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.bound}"

    @property
    def bound(self) -> HostPort:
        """The address really listened on (``bind`` with its port filled in when it was 0)."""
        if self._server is None or not self._server.sockets:
            return self.bind
        return HostPort(self.bind.host, int(self._server.sockets[0].getsockname()[1]))

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._handle, self.bind.host, self.bind.port, reuse_address=True
            )
        except OSError as err:
            raise SidecarConfigError(
                f"cannot serve the health endpoints on {self.bind}: {err.strerror or err}; "
                f"choose another {self._setting} (or 0 to turn it off)"
            ) from err

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = Stream(reader, writer)
        try:
            head = await asyncio.wait_for(read_request_head(stream), REQUEST_TIMEOUT_SECONDS)
            if head is not None:
                stream.write(await self._respond(head.method, head.path))
                await stream.drain()
        except HttpError as err:
            with contextlib.suppress(OSError):
                stream.write(simple_response(err.status, err.message + "\n", keep_alive=False))
        except (OSError, TimeoutError):
            pass
        finally:
            await stream.close()

    async def _respond(self, method: str, path: str) -> bytes:
        if method not in ("GET", "HEAD"):
            return simple_response(405, "use GET\n", keep_alive=False)
        if path == "/live":
            return _json(200, {"status": "live"})
        if path == "/ready":
            problem = self._ready()
            if problem:
                return _json(503, {"status": "not ready", "reason": problem})
            return _json(200, {"status": "ready"})
        if path == "/metrics":
            body = self._metrics.exposition()
            if self._more_metrics is not None:
                body += await self._more_metrics()
            head = (
                "HTTP/1.1 200 OK\r\n"
                f"Content-Type: {CONTENT_TYPE_LATEST}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            return head.encode() + body
        return simple_response(404, "try /live, /ready or /metrics\n", keep_alive=False)


def _json(status: int, document: dict[str, Any]) -> bytes:
    body = json.dumps(document).encode()
    reason = {200: "OK", 503: "Service Unavailable"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body
