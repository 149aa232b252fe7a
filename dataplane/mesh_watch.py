"""Following the mesh configuration and catalog through the node's agent.

The agent's ``Mesh.WatchMesh`` call (``sdk/_proto/mesh_agent.proto``) sends the whole
configuration (the resources' documents) and catalog (the instances) at once, then after
each change. This keeps the call open, opens it again (with capped backoff) when it ends,
and hands each snapshot over, parsed, to ``on_snapshot``::

    watch = MeshWatch(socket="unix:///run/tessera/agent.sock", on_snapshot=apply)
    task = asyncio.create_task(watch.run())
    watch.revision, watch.problem       # the last revision taken; why none comes now

A snapshot at revision 0 is the agent saying it has no configuration from the server yet
(it just started): it is not handed over, so that a proxy never takes "no policy" for the
mesh's word; the proxy keeps what it has until the agent's next snapshot. A snapshot that
does not parse (a resource from a newer server) is logged and skipped likewise.

Messages are bounded (:data:`MAX_SNAPSHOT_BYTES`). It speaks gRPC with grpcio, as
:mod:`dataplane.registration` does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc  # type: ignore[import-untyped]

from mesh import Catalog, Config, ConfigError, Instance, parse_resource
from sdk._proto import mesh_agent_pb2
from sdk.backoff import Backoff
from sdk.errors import ConfigError as AddressError

__all__ = ["MAX_SNAPSHOT_BYTES", "MeshSnapshot", "MeshWatch"]

_log = logging.getLogger("tessera.sidecar")
_pb: Any = mesh_agent_pb2
_METHOD: Final = "/tessera.agent.v1.Mesh/WatchMesh"
_METADATA: Final = (("workload.spiffe.io", "true"),)

MAX_SNAPSHOT_BYTES: Final = 32 * 1024 * 1024
"""The largest snapshot taken: configuration (at most 4 MiB of YAML as applied) and
catalog, as JSON."""


@dataclass(frozen=True)
class MeshSnapshot:
    """The mesh at one revision: its configuration and its catalog."""

    revision: int
    config: Config
    catalog: Catalog


class SnapshotError(Exception):
    """A snapshot that does not read as a configuration and a catalog."""


def parse_snapshot(revision: int, resources_json: bytes, instances_json: bytes) -> MeshSnapshot:
    """The snapshot the agent sent; SnapshotError says what in it does not read."""
    try:
        documents = json.loads(resources_json)
        instances = json.loads(instances_json)
    except (ValueError, UnicodeDecodeError) as err:
        raise SnapshotError(f"it is not JSON: {err}") from err
    if not isinstance(documents, list) or not isinstance(instances, list):
        raise SnapshotError("its resources and instances are not lists")
    try:
        config = Config(parse_resource(document, source="WatchMesh") for document in documents)
    except ConfigError as err:
        raise SnapshotError("; ".join(str(error) for error in err.errors)) from err
    try:
        catalog = Catalog(Instance.from_json(instance) for instance in instances)
    except (ValueError, TypeError, KeyError, AddressError) as err:
        raise SnapshotError(f"an instance does not read: {err}") from err
    return MeshSnapshot(revision, config, catalog)


class MeshWatch:
    """Hands every snapshot of the mesh to ``on_snapshot``, by :meth:`run` until cancelled."""

    def __init__(self, *, socket: str, on_snapshot: Callable[[MeshSnapshot], None]) -> None:
        self._target = socket if socket.startswith("unix:") else f"unix://{socket}"
        self._on_snapshot = on_snapshot
        self.revision = 0
        """The revision of the last snapshot handed over (0: none yet)."""
        self.problem: str | None = "not connected to the agent yet"
        """Why no snapshot comes now, or None while the call is open."""

    async def run(self) -> None:
        backoff = Backoff(initial=0.5, maximum=10.0, jitter=0.5)
        options = [("grpc.max_receive_message_length", MAX_SNAPSHOT_BYTES)]
        while True:
            try:
                async with grpc.aio.insecure_channel(self._target, options=options) as channel:
                    call = channel.unary_stream(
                        _METHOD,
                        request_serializer=_pb.WatchMeshRequest.SerializeToString,
                        response_deserializer=_pb.MeshSnapshot.FromString,
                    )(_pb.WatchMeshRequest(), metadata=_METADATA)
                    async for message in call:
                        backoff.reset()
                        self.problem = None
                        self._take(message)
            except grpc.aio.AioRpcError as err:
                self.problem = f"WatchMesh failed: {err.details() or err.code().name}"
            else:
                self.problem = "the agent ended the WatchMesh call"
            delay = backoff.next()
            _log.warning("%s; keeping mesh revision %d and asking again in %.1f s",
                         self.problem, self.revision, delay)  # fmt: skip
            await asyncio.sleep(delay)

    def _take(self, message: Any) -> None:
        revision = int(message.revision)
        if revision == 0:
            _log.info("the agent has no mesh configuration from its server yet; waiting for it")
            return
        try:
            snapshot = parse_snapshot(
                revision, bytes(message.resources_json), bytes(message.instances_json)
            )
        except SnapshotError as err:
            _log.error("mesh revision %d from the agent does not read, so revision %d stays in "
                       "effect: %s; upgrade this sidecar to the server's version",
                       revision, self.revision, err)  # fmt: skip
            return
        self.revision = revision
        try:
            self._on_snapshot(snapshot)
        except Exception:  # a bug in the consumer must not end the watch
            _log.exception("applying mesh revision %d failed", revision)
