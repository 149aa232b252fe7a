"""``tessera.agent.v1.Mesh`` on the agent's socket: proxies register their app and watch
the mesh (``sdk/_proto/mesh_agent.proto``).

The caller is who the kernel says it is: its peer credentials are attested like a
Workload API caller's, and it may register an instance only for a SPIFFE ID it holds an
SVID for. The server then decides whether the Service takes it
(:mod:`workload_api.instances`). Errors are gRPC statuses with a sentence:
``INVALID_ARGUMENT`` for a malformed request, ``PERMISSION_DENIED`` for an identity the
caller lacks or a Service that does not allow it, ``NOT_FOUND`` for a Service that does
not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream

from mesh.registration import label_problem
from sdk._proto import mesh_agent_pb2
from sdk.address import HostPort
from sdk.errors import ConfigError, InvalidArgument, PermissionDenied, TesseraError
from workload_api.identity import IdentityProvider
from workload_api.instances import LocalInstances, Registration
from workload_api.mesh_sync import MeshState
from workload_api.server import NO_IDENTITY, grpc_status, receive_request, workload_caller

__all__ = ["MeshService"]

_log = logging.getLogger(__name__)
_pb: Any = mesh_agent_pb2
_AnyStream = Stream[Any, Any]
_MAX_NAME = 63


class MeshService:
    """Register and WatchMesh, for the proxies on this node."""

    def __init__(
        self, provider: IdentityProvider, instances: LocalInstances, mesh: MeshState
    ) -> None:
        self._provider = provider
        self._instances = instances
        self._mesh = mesh
        self._active: set[asyncio.Task[Any]] = set()
        self._closing = False

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/tessera.agent.v1.Mesh/Register": Handler(
                self.Register, Cardinality.UNARY_STREAM,
                _pb.RegisterRequest, _pb.RegisterUpdate,
            ),
            "/tessera.agent.v1.Mesh/WatchMesh": Handler(
                self.WatchMesh, Cardinality.UNARY_STREAM,
                _pb.WatchMeshRequest, _pb.MeshSnapshot,
            ),
        }  # fmt: skip

    async def shut_down(self, grace: float) -> None:
        """End open calls with UNAVAILABLE. Their instances stay registered at the server
        until the lease runs out (the agent is going, not the apps)."""
        self._closing = True
        for task in list(self._active):
            task.cancel()
        if self._active:
            await asyncio.wait(list(self._active), timeout=grace)

    async def Register(self, stream: _AnyStream) -> None:
        await self._serve(stream, self._register)

    async def WatchMesh(self, stream: _AnyStream) -> None:
        await self._serve(stream, self._watch_mesh)

    async def _serve(self, stream: _AnyStream, body: Any) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
            task.add_done_callback(self._active.discard)
        try:
            peer = workload_caller(stream)
            request = await receive_request(stream)
            if request is None:
                raise InvalidArgument("the call carried no request")
            selectors = await self._provider.attest(peer)
            held = {svid.spiffe_id for svid in self._provider.x509_context(selectors).svids}
            if not held:
                raise PermissionDenied(NO_IDENTITY)
            await body(stream, request, held)
        except TesseraError as err:
            raise GRPCError(grpc_status(err), err.message) from err
        except asyncio.CancelledError:
            # Only when the agent is stopping: grpclib also cancels a call whose proxy
            # left, and that is no error at all.
            if self._closing:
                raise GRPCError(
                    Status.UNAVAILABLE, "the Tessera agent is shutting down; register again "
                    "with its replacement"
                ) from None
            raise

    async def _register(self, stream: _AnyStream, request: Any, held: set[str]) -> None:
        registration = _registration(request, held)
        instance = await self._instances.register(registration)
        try:
            while True:
                seen = instance.version
                changed = instance.changed
                await stream.send_message(_pb.RegisterUpdate(
                    health=instance.health, detail=instance.detail,
                    mesh_revision=self._mesh.revision,
                ))  # fmt: skip
                if instance.version == seen:
                    await changed.wait()
                if instance.refused is not None:
                    raise PermissionDenied(instance.refused)
        except StreamTerminatedError:
            return  # the proxy left
        finally:
            self._instances.deregister(instance)

    async def _watch_mesh(self, stream: _AnyStream, request: Any, held: set[str]) -> None:
        seen = -1
        with contextlib.suppress(StreamTerminatedError):
            while True:
                if self._mesh.revision == seen:
                    await self._mesh.wait_for_change(seen)
                seen = self._mesh.revision
                await stream.send_message(_pb.MeshSnapshot(
                    revision=seen,
                    resources_json=json.dumps(self._mesh.config.to_documents()).encode(),
                    instances_json=json.dumps(
                        [instance.to_json() for instance in self._mesh.catalog]
                    ).encode(),
                ))  # fmt: skip


def _registration(request: Any, held: set[str]) -> Registration:
    """The request checked: names, addresses, labels, and an SVID the caller holds."""
    service, spiffe_id = str(request.service), str(request.spiffe_id)
    if not service or len(service) > _MAX_NAME:
        raise InvalidArgument("a registration names its Service (metadata.name, at most 63 "
                              "characters)")
    if spiffe_id not in held:
        raise PermissionDenied(
            f"this process holds no SVID for {spiffe_id or 'an empty SPIFFE ID'}; it holds "
            f"{', '.join(sorted(held))}: register with one of them (--spiffe-id)"
        )
    try:
        address = HostPort.parse(str(request.address), what="instance address")
        check = (
            HostPort.parse(str(request.check_address), what="health-check address")
            if request.check_address else address
        )
    except ConfigError as err:
        raise InvalidArgument(err.message) from err
    labels = dict(request.labels)
    if (problem := label_problem(labels)) is not None:
        raise InvalidArgument(problem)
    return Registration(service, spiffe_id, address, labels, check)
