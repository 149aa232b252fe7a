"""Keeping an app registered as an instance of its Service, through the node's agent.

The agent's ``Mesh.Register`` call (``sdk/_proto/mesh_agent.proto``) keeps an instance
in the catalog while it stays open; this holds it open, and opens it again (with capped
backoff) when the agent restarts or the Service refuses the instance for now (a Service
not applied yet, say), so an instance rejoins by itself once what was missing is there.

A refusal is logged once as a WARNING, and again only when its reason changes (each
retry that meets the same one logs at DEBUG). While refused, it follows the agent's mesh
revision (``Mesh.WatchMesh``) and tries again at once, backoff reset, when it moves (a
Service applied, say), rather than waiting out the backoff. The watch's first snapshot
also counts, so a change between the refusal and the watch's start is not missed::

    registration = InstanceRegistration(
        socket="/run/tessera/agent.sock", service="users-service",
        spiffe_id="spiffe://example.org/users", address=HostPort("10.0.0.5", 8443),
        check_address=HostPort("127.0.0.1", 8080), labels={"version": "v1"},
    )
    task = asyncio.create_task(registration.run())
    registration.health, registration.problem   # what the agent last said

It speaks gRPC with grpcio, as the SDK's Workload API client does; the agent serves the
call with grpclib.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import grpc  # type: ignore[import-untyped]

from dataplane.mesh_watch import MAX_SNAPSHOT_BYTES
from sdk._proto import mesh_agent_pb2
from sdk.address import HostPort
from sdk.backoff import Backoff

__all__ = ["InstanceRegistration"]

MESH_RETRY_SECONDS: Final = 1.0
"""At most one registration attempt per this many seconds when the mesh changes."""
_log = logging.getLogger("tessera.sidecar")
_pb: Any = mesh_agent_pb2
_METHOD: Final = "/tessera.agent.v1.Mesh/Register"
_WATCH_METHOD: Final = "/tessera.agent.v1.Mesh/WatchMesh"
_METADATA: Final = (("workload.spiffe.io", "true"),)
# A refusal the proxy can do nothing about by waiting: it stops trying.
_FINAL: Final = frozenset({grpc.StatusCode.INVALID_ARGUMENT})
# Refusals a change to the mesh can lift (a Service applied, its spiffeIds changed).
_MESH_CAN_LIFT: Final = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED})


class InstanceRegistration:
    """One instance, kept registered by :meth:`run` until cancelled."""

    def __init__(
        self,
        *,
        socket: str,
        service: str,
        spiffe_id: str,
        address: HostPort,
        check_address: HostPort,
        labels: Mapping[str, str] | None = None,
        on_change: Callable[[InstanceRegistration], None] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._target = socket if socket.startswith("unix:") else f"unix://{socket}"
        self._request = _pb.RegisterRequest(
            service=service, spiffe_id=spiffe_id, address=str(address),
            check_address=str(check_address), labels=dict(labels or {}),
        )  # fmt: skip
        self._on_change = on_change
        self._backoff = backoff or Backoff(initial=0.5, maximum=10.0, jitter=0.5)
        self._logged: str | None = None  # the refusal last logged as a WARNING
        self._mesh_changed = asyncio.Event()
        self._mesh_watch: asyncio.Task[None] | None = None
        self.service = service
        self.registered = False
        self.health = "unknown"
        self.detail = "not registered yet"
        self.problem: str | None = None
        """Why the instance is not registered now, or None."""

    async def run(self) -> None:
        """Register, follow the agent's updates, and register again whenever the call
        ends; returns only when the request itself is malformed (see :attr:`problem`)."""
        backoff = self._backoff
        try:
            while True:
                attempted = time.monotonic()
                try:
                    async with grpc.aio.insecure_channel(self._target) as channel:
                        call = channel.unary_stream(
                            _METHOD,
                            request_serializer=_pb.RegisterRequest.SerializeToString,
                            response_deserializer=_pb.RegisterUpdate.FromString,
                        )(self._request, metadata=_METADATA)
                        async for update in call:
                            backoff.reset()
                            self._logged = None
                            self._stop_following_mesh()
                            self._set(True, str(update.health), str(update.detail), None)
                except grpc.aio.AioRpcError as err:
                    reason = err.details() or err.code().name
                    self._set(False, "unknown", "not registered", reason)
                    if err.code() in _FINAL:
                        _log.error("cannot register %s: %s", self.service, reason)
                        return
                    if err.code() in _MESH_CAN_LIFT:
                        self._follow_mesh()
                        self._log_refusal(reason, "trying again when the mesh changes")
                    else:
                        self._log_refusal(reason, "trying again")
                else:
                    self._set(False, "unknown", "not registered", "the agent ended the call")
                if await self._wait_for_mesh_change(backoff.next()):
                    backoff.reset()
                    # Revisions may come by the dozen (health flaps, other instances):
                    # one attempt per MESH_RETRY_SECONDS at most, not one per revision.
                    pause = attempted + MESH_RETRY_SECONDS - time.monotonic()
                    await asyncio.sleep(max(0.0, pause))
        finally:
            self._stop_following_mesh()

    def _log_refusal(self, reason: str, then: str) -> None:
        """A WARNING for a reason not logged yet; DEBUG for the same one again."""
        level = logging.DEBUG if reason == self._logged else logging.WARNING
        self._logged = reason
        _log.log(level, "%s is not registered: %s; %s", self.service, reason, then)

    async def _wait_for_mesh_change(self, delay: float) -> bool:
        """Wait ``delay`` seconds, or less when the agent's mesh revision moves first;
        whether it moved."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._mesh_changed.wait()
        changed = self._mesh_changed.is_set()
        self._mesh_changed.clear()
        return changed

    def _follow_mesh(self) -> None:
        if self._mesh_watch is None or self._mesh_watch.done():
            self._mesh_changed.clear()
            self._mesh_watch = asyncio.create_task(self._watch_mesh())

    def _stop_following_mesh(self) -> None:
        if self._mesh_watch is not None:
            self._mesh_watch.cancel()
            self._mesh_watch = None

    async def _watch_mesh(self) -> None:
        """Set :attr:`_mesh_changed` on each of the agent's mesh snapshots (the first,
        then one per revision) until cancelled; when the call fails, the backoff alone
        paces the retries."""
        options = [("grpc.max_receive_message_length", MAX_SNAPSHOT_BYTES)]
        try:
            async with grpc.aio.insecure_channel(self._target, options=options) as channel:
                call = channel.unary_stream(
                    _WATCH_METHOD,
                    request_serializer=_pb.WatchMeshRequest.SerializeToString,
                    response_deserializer=_pb.MeshSnapshot.FromString,
                )(_pb.WatchMeshRequest(), metadata=_METADATA)
                async for _ in call:
                    self._mesh_changed.set()
        except grpc.aio.AioRpcError as err:
            _log.debug("not following the mesh revision while %s is not registered: %s",
                       self.service, err.details() or err.code().name)  # fmt: skip

    def _set(self, registered: bool, health: str, detail: str, problem: str | None) -> None:
        changed = (registered, health, problem) != (self.registered, self.health, self.problem)
        if registered and not self.registered:
            _log.info("%s registered with the agent", self.service)
        self.registered, self.health, self.detail, self.problem = (
            registered, health, detail, problem,
        )
        if changed and registered:
            _log.info("%s is %s: %s", self.service, health, detail)
        if changed and self._on_change is not None:
            self._on_change(self)
