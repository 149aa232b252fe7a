"""The agent's mesh configuration: applied change by change, read by the proxies.

:class:`MeshState` is fed :class:`MeshUpdate`s as the node API sends them; the agent's
sync loop fetches one only when the server's mesh revision differs from its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mesh import Config, parse_documents
from sdk.clock import ManualClock
from tests.unit.workload_api.agent_helpers import AuthorityForTests, FakeNodeApi
from tests.unit.workload_api.test_agent import attested_before, config
from workload_api.agent import Agent
from workload_api.mesh_sync import MeshState
from workload_api.node_client import MeshUpdate

NOW = datetime.now(UTC).replace(microsecond=0)

USERS = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: users}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{number: 80, name: http, protocol: HTTP}]
"""
ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: users}
spec:
  hosts: [users]
  http:
  - route: [{destination: {host: users}}]
"""


def sent(text: str, revision: int) -> dict[str, Any]:
    """A resource as the node API sends it."""
    (resource,) = parse_documents(text)
    return {"kind": resource.KIND, "name": resource.name, "revision": revision,
            "document": resource.to_document()}


def update(revision: int, *resources: dict[str, Any], full: bool = False,
           deleted: tuple[tuple[str, str], ...] = ()) -> MeshUpdate:
    return MeshUpdate(revision=revision, full=full, resources=resources, deleted=deleted)


def keys(state: MeshState) -> list[str]:
    return [str(resource.key) for resource in state.config]


def metric(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


def test_changes_are_applied_one_by_one_and_told_to_listeners() -> None:
    state = MeshState()
    heard: list[tuple[list[str], int]] = []
    state.add_listener(lambda config, revision: heard.append(
        ([str(r.key) for r in config], revision)))
    assert (state.config, state.revision) == (Config(), 0)

    state.apply(update(1, sent(USERS, 1), full=True))
    state.apply(update(2, sent(ROUTE, 2)))
    assert keys(state) == ["VirtualService users", "Service users"]
    assert metric("tessera_agent_mesh_revision") == 2
    assert metric("tessera_agent_mesh_resources") == 2

    changed = sent(USERS.replace("80,", "8080,"), 3)
    state.apply(update(3, changed))
    service = state.config.of_kind(type(parse_documents(USERS)[0]))[0]
    assert service.to_document() == changed["document"]

    state.apply(update(4, deleted=(("VirtualService", "users"),)))
    assert keys(state) == ["Service users"]
    assert heard == [
        (["Service users"], 1),
        (["VirtualService users", "Service users"], 2),
        (["VirtualService users", "Service users"], 3),
        (["Service users"], 4),
    ]


def test_a_full_update_replaces_everything() -> None:
    state = MeshState()
    state.apply(update(2, sent(USERS, 1), sent(ROUTE, 2), full=True))
    state.apply(update(9, sent(USERS, 7), full=True))  # the route went meanwhile
    assert (keys(state), state.revision) == (["Service users"], 9)


def test_a_resource_this_agent_cannot_read_is_left_out_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = MeshState()
    newer = sent(ROUTE, 2)
    newer["document"]["spec"]["http"][0]["corsPolicy"] = {}  # a field it does not know
    with caplog.at_level(logging.ERROR, logger="workload_api.mesh_sync"):
        state.apply(update(2, sent(USERS, 1), newer, full=True))
    assert (keys(state), state.revision) == (["Service users"], 2)
    assert [r.getMessage() for r in caplog.records] == [
        "leaving VirtualService users out of the mesh configuration: this agent cannot read "
        "it (VirtualService users: spec.http[0].corsPolicy is not supported); upgrade the "
        "agent to the server's version"]


def test_wait_for_change_returns_once_the_revision_moves() -> None:
    async def scenario() -> int:
        state = MeshState()
        waiting = asyncio.ensure_future(state.wait_for_change(0))
        await asyncio.sleep(0)
        assert not waiting.done()
        state.apply(update(5, sent(USERS, 5), full=True))
        return await asyncio.wait_for(waiting, 5)

    assert asyncio.run(scenario()) == 5


def test_a_listener_that_fails_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = MeshState()
    heard: list[int] = []

    def broken(config: Config, revision: int) -> None:
        raise RuntimeError("a bug")

    state.add_listener(broken)
    state.add_listener(lambda config, revision: heard.append(revision))
    with caplog.at_level(logging.ERROR, logger="workload_api.mesh_sync"):
        state.apply(update(1, sent(USERS, 1), full=True))
    assert heard == [1]
    assert "a mesh configuration listener failed" in caplog.text


# -- in the agent's sync loop -------------------------------------------------------------


def test_the_agent_fetches_the_mesh_only_when_the_servers_revision_moves(
    tmp_path: Path,
) -> None:
    clock = ManualClock(NOW)
    authority = AuthorityForTests("example.org", NOW)
    api = FakeNodeApi(authority=authority, clock=clock)
    attested_before(tmp_path, authority, NOW)
    agent = Agent(config(tmp_path), clock=clock, rng=random.Random(1), progress=lambda _: None,
                  workload_attestors=[], node_client=api)  # type: ignore[arg-type]

    async def scenario() -> None:
        await agent.start()  # a server without a mesh: nothing fetched
        api.mesh = update(1, sent(USERS, 1), full=True)
        await agent.sync_once(wait=0)
        await agent.sync_once(wait=0)  # idle: the revision did not move
        api.mesh = update(2, sent(ROUTE, 2))
        await agent.sync_once(wait=0)

    asyncio.run(scenario())
    assert api.mesh_asked == [
        ("entries", 0), ("entries", 0), ("mesh", 0), ("entries", 1), ("entries", 1), ("mesh", 1)]
    assert (keys(agent.mesh), agent.mesh.revision) == (
        ["VirtualService users", "Service users"], 2)
