"""Keeping an app registered as an instance of its Service, through the node's agent.

The agent's ``Mesh.Register`` call (``sdk/_proto/mesh_agent.proto``) keeps an instance
in the catalog while it stays open; this holds it open, and opens it again (with capped
backoff) when the agent restarts or the Service refuses the instance for now (a Service
not applied yet, say), so an instance rejoins by itself once what was missing is there::

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
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

import grpc  # type: ignore[import-untyped]

from sdk._proto import mesh_agent_pb2
from sdk.address import HostPort
from sdk.backoff import Backoff

__all__ = ["InstanceRegistration"]

_log = logging.getLogger("tessera.sidecar")
_pb: Any = mesh_agent_pb2
_METHOD: Final = "/tessera.agent.v1.Mesh/Register"
_METADATA: Final = (("workload.spiffe.io", "true"),)
# A refusal the proxy can do nothing about by waiting: it stops trying.
_FINAL: Final = frozenset({grpc.StatusCode.INVALID_ARGUMENT})


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
    ) -> None:
        self._target = socket if socket.startswith("unix:") else f"unix://{socket}"
        self._request = _pb.RegisterRequest(
            service=service, spiffe_id=spiffe_id, address=str(address),
            check_address=str(check_address), labels=dict(labels or {}),
        )  # fmt: skip
        self._on_change = on_change
        self.service = service
        self.registered = False
        self.health = "unknown"
        self.detail = "not registered yet"
        self.problem: str | None = None
        """Why the instance is not registered now, or None."""

    async def run(self) -> None:
        """Register, follow the agent's updates, and register again whenever the call
        ends; returns only when the request itself is malformed (see :attr:`problem`)."""
        backoff = Backoff(initial=0.5, maximum=10.0, jitter=0.5)
        while True:
            try:
                async with grpc.aio.insecure_channel(self._target) as channel:
                    call = channel.unary_stream(
                        _METHOD,
                        request_serializer=_pb.RegisterRequest.SerializeToString,
                        response_deserializer=_pb.RegisterUpdate.FromString,
                    )(self._request, metadata=_METADATA)
                    async for update in call:
                        backoff.reset()
                        self._set(True, str(update.health), str(update.detail), None)
            except grpc.aio.AioRpcError as err:
                reason = err.details() or err.code().name
                self._set(False, "unknown", "not registered", reason)
                if err.code() in _FINAL:
                    _log.error("cannot register %s: %s", self.service, reason)
                    return
                _log.warning("%s is not registered: %s; trying again", self.service, reason)
            else:
                self._set(False, "unknown", "not registered", "the agent ended the call")
            await asyncio.sleep(backoff.next())

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
