"""Following WatchMesh: a gRPC server on a Unix socket stands in for the agent's."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest

from dataplane.mesh_watch import MeshSnapshot, MeshWatch, SnapshotError, parse_snapshot
from sdk._proto import mesh_agent_pb2

pb: Any = mesh_agent_pb2

SERVICE = {
    "apiVersion": "tessera.io/v1alpha1", "kind": "Service", "metadata": {"name": "users"},
    "spec": {"spiffeIds": ["spiffe://example.org/users"],
             "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]},
}  # fmt: skip
INSTANCE = {
    "service": "users", "address": "10.0.0.5:15006", "node": "spiffe://example.org/node/a",
    "labels": {"app": "users"}, "health": "healthy", "since": "2025-01-01T00:00:00+00:00",
    "spiffeId": "spiffe://example.org/users",
}  # fmt: skip


def snapshot(revision: int, resources: Any = (), instances: Any = ()) -> Any:
    return pb.MeshSnapshot(revision=revision, resources_json=json.dumps(list(resources)).encode(),
                           instances_json=json.dumps(list(instances)).encode())  # fmt: skip


def test_a_snapshot_reads_as_a_configuration_and_a_catalog() -> None:
    taken = parse_snapshot(4, json.dumps([SERVICE]).encode(), json.dumps([INSTANCE]).encode())
    assert taken.revision == 4
    assert [resource.name for resource in taken.config] == ["users"]
    assert [str(instance.address) for instance in taken.catalog] == ["10.0.0.5:15006"]


@pytest.mark.parametrize(("resources", "instances", "error"), [
    (b"[", b"[]", "it is not JSON: "),
    (b"{}", b"[]", "its resources and instances are not lists"),
    (json.dumps([{**SERVICE, "kind": "Nope"}]).encode(), b"[]", "kind must be one of"),
    (b"[]", json.dumps([{**INSTANCE, "health": "fine"}]).encode(),
     "an instance does not read: 'fine' is not a health"),
])  # fmt: skip
def test_a_snapshot_that_does_not_read_says_why(
    resources: bytes, instances: bytes, error: str
) -> None:
    with pytest.raises(SnapshotError, match=error.replace("(", r"\(")):
        parse_snapshot(1, resources, instances)


class Agent:
    """Serves WatchMesh: the first call sends ``script``'s snapshots, then ends; the next
    ones send nothing and stay open (so what the first one left is what the test reads)."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls = 0

    async def watch_mesh(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.calls += 1
        if self.calls > 1:
            await asyncio.Event().wait()
        for message in self.script:
            yield message


async def serve(agent: Agent, path: Path) -> Any:
    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(
        agent.watch_mesh, request_deserializer=pb.WatchMeshRequest.FromString,
        response_serializer=pb.MeshSnapshot.SerializeToString,
    )  # fmt: skip
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("tessera.agent.v1.Mesh", {"WatchMesh": handler})])
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    return server


def test_only_readable_snapshots_past_revision_0_are_handed_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent([
        snapshot(0),                                        # the agent has none yet
        snapshot(2, [SERVICE], [INSTANCE]),
        snapshot(3, [{**SERVICE, "kind": "Nope"}]),         # from a newer server
        snapshot(4, [SERVICE]),
    ])  # fmt: skip
    taken: list[MeshSnapshot] = []

    async def main() -> None:
        server = await serve(agent, tmp_path / "agent.sock")
        watch = MeshWatch(socket=str(tmp_path / "agent.sock"), on_snapshot=taken.append)
        task = asyncio.create_task(watch.run())
        try:
            async with asyncio.timeout(5):
                while agent.calls < 2:  # the call ended; the watch asked again
                    await asyncio.sleep(0.02)
            assert watch.revision == 4
        finally:
            task.cancel()
            await server.stop(0)

    with caplog.at_level(logging.INFO, logger="tessera.sidecar"):
        asyncio.run(main())
    assert [item.revision for item in taken[:2]] == [2, 4]
    assert len(taken[1].catalog) == 0
    assert "the agent has no mesh configuration from its server yet" in caplog.text
    assert "mesh revision 3 from the agent does not read, so revision 2 stays in effect" in (
        caplog.text)
    assert "the agent ended the WatchMesh call; keeping mesh revision 4 and asking again" in (
        caplog.text)
