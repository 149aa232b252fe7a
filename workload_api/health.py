"""The agent's health endpoints and Prometheus metrics, on ``--health-bind``.

    GET /live      200 while the agent process runs its loop
    GET /ready     200 once the agent has an identity and has synced with a server;
                   503 with {"status": "not ready", "reason": ...} otherwise
    GET /metrics   Prometheus text: the metrics below and the Workload API call counts

    server = HealthServer(Address("127.0.0.1", 8088), ready=agent.ready_problem)
    await server.start()
    ...
    await server.stop()

It is a small FastAPI app served by uvicorn in the agent's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Final

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from sdk.errors import ConfigError
from workload_api.config import Address

__all__ = [
    "AGENT_SVID_EXPIRY",
    "CACHED_JWT_SVIDS",
    "CACHED_X509_SVIDS",
    "ENTRIES",
    "LAST_SYNC",
    "MESH_LOCAL_INSTANCES",
    "MESH_RESOURCES",
    "MESH_REVISION",
    "SVIDS_ROTATED",
    "SYNC_FAILURES",
    "SYNC_LAG",
    "HealthServer",
    "create_health_app",
]

_log = logging.getLogger(__name__)

ENTRIES: Final = Gauge("tessera_agent_entries", "Registration entries authorized for this agent")
CACHED_X509_SVIDS: Final = Gauge("tessera_agent_x509_svids", "X509-SVIDs in the agent's cache")
CACHED_JWT_SVIDS: Final = Gauge("tessera_agent_jwt_svids", "JWT-SVIDs in the agent's cache")
LAST_SYNC: Final = Gauge(
    "tessera_agent_last_sync_timestamp_seconds",
    "UNIX time of the last successful sync with a server",
)
SYNC_LAG: Final = Gauge(
    "tessera_agent_sync_lag_seconds", "Seconds since the last successful sync with a server"
)
SVIDS_ROTATED: Final = Counter(
    "tessera_agent_svids_rotated_total", "SVIDs renewed before they expired", ["kind"]
)
SYNC_FAILURES: Final = Counter(
    "tessera_agent_sync_failures_total", "Syncs that failed because no server answered"
)
for _kind in ("agent", "x509", "jwt"):
    SVIDS_ROTATED.labels(_kind)
MESH_REVISION: Final = Gauge(
    "tessera_agent_mesh_revision",
    "The server's mesh configuration revision this agent has (0: none received)",
)
MESH_LOCAL_INSTANCES: Final = Gauge(
    "tessera_agent_mesh_local_instances",
    "Mesh instances registered through this agent (by the proxies on its node)",
)
MESH_RESOURCES: Final = Gauge(
    "tessera_agent_mesh_resources", "Resources in the agent's mesh configuration"
)
AGENT_SVID_EXPIRY: Final = Gauge(
    "tessera_agent_svid_expiry_timestamp_seconds", "UNIX time the agent's own SVID expires"
)


def create_health_app(ready: Callable[[], str | None]) -> FastAPI:
    """``ready()`` returns None when ready, else the reason it is not."""
    app = FastAPI(title="Tessera agent health", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/live")
    def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/ready")
    def ready_check() -> Response:
        problem = ready()
        if problem:
            body = {"status": "not ready", "reason": problem}
            return Response(json.dumps(body), status_code=503, media_type="application/json")
        return Response(json.dumps({"status": "ready"}), media_type="application/json")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the agent stops everything together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HealthServer:
    def __init__(self, address: Address, ready: Callable[[], str | None]) -> None:
        self.address = address
        self._ready = ready
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind now (a taken port is a ConfigError), then serve in the background."""
        sock = _bind(self.address)
        config = uvicorn.Config(
            create_health_app(self._ready),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise ConfigError(f"the health endpoints could not start on {self.address}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self._server = None
        self._task = None


def _bind(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"cannot serve the health endpoints on {address}: {err.strerror}; choose another "
            "--health-bind, or 0 to turn them off"
        ) from err
    sock.listen(128)
    sock.setblocking(False)
    return sock
