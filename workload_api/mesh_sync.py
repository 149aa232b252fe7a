"""The mesh configuration and catalog as this agent knows them, kept current for the
proxies on its node.

The agent's sync loop keeps it: every entries answer carries the server's mesh revision
(the long poll also wakes when it moves), and when that differs from the agent's, the
loop fetches what changed since the agent's revision and applies it here, resource by
resource. The whole configuration is sent only to an agent that has none yet, or whose
revision is older than the deletions the server still remembers. What the proxies read::

    state = agent.mesh
    state.config, state.revision                     # a mesh.Config (immutable), its revision
    state.catalog                                    # a mesh.Catalog: every instance, health
    state.add_listener(lambda config, revision: ...)  # called after each change
    revision = await state.wait_for_change(seen)      # for a task serving proxies

A resource this agent cannot read (sent by a newer server, with a field it does not
know) is left out of its configuration, with an error in the log naming it: the agent
keeps serving the rest, and an upgrade brings it in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from mesh import Config, ConfigError, Resource, ResourceKey, parse_resource
from mesh.catalog import Catalog, Instance
from workload_api import health
from workload_api.node_client import MeshUpdate

__all__ = ["MeshListener", "MeshState"]

_log = logging.getLogger(__name__)

MeshListener = Callable[[Config, int], None]
"""Called with the new configuration and its revision, in the agent's event loop; it
must be quick and must not raise."""


class MeshState:
    """The current mesh configuration and its revision (0: none received yet)."""

    def __init__(self) -> None:
        self._config = Config()
        self._instances: dict[tuple[str, str, str], Instance] = {}
        self._catalog = Catalog()
        self._revision = 0
        self._listeners: list[MeshListener] = []
        self._changed = asyncio.Event()
        health.MESH_REVISION.set_function(lambda: self._revision)
        health.MESH_RESOURCES.set_function(lambda: len(self._config))

    @property
    def config(self) -> Config:
        return self._config

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    @property
    def revision(self) -> int:
        return self._revision

    def add_listener(self, listener: MeshListener) -> None:
        self._listeners.append(listener)

    async def wait_for_change(self, seen_revision: int) -> int:
        """Return the revision once it is not ``seen_revision``."""
        while self._revision == seen_revision:
            await self._changed.wait()
        return self._revision

    def apply(self, update: MeshUpdate) -> None:
        """Take the server's changes: replace, add and drop resources (everything, when
        ``update.full``); then tell the listeners."""
        resources: dict[ResourceKey, Resource] = (
            {} if update.full else {resource.key: resource for resource in self._config}
        )
        for kind, name in update.deleted:
            resources.pop(ResourceKey(kind, name), None)
        for item in update.resources:
            key = ResourceKey(str(item.get("kind")), str(item.get("name")))
            resources.pop(key, None)
            resource = _readable(key, item.get("document"))
            if resource is not None:
                resources[resource.key] = resource
        self._config = Config(resources.values())
        if update.full:
            self._instances = {}
        for gone in update.removed_instances:
            self._instances.pop(gone, None)
        for instance in update.instances:
            self._instances[(instance.node, instance.service, str(instance.address))] = instance
        self._catalog = Catalog(self._instances.values())
        previous, self._revision = self._revision, update.revision
        if previous != self._revision:
            _log.info(
                "mesh at revision %d: %d resource(s), %d instance(s)",
                self._revision, len(self._config), len(self._catalog),
            )
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for listener in self._listeners:
            try:
                listener(self._config, self._revision)
            except Exception:  # one consumer's bug must not stop the sync
                _log.exception("a mesh configuration listener failed")


def _readable(key: ResourceKey, document: Any) -> Resource | None:
    """The typed resource, or None (logged) when this agent cannot read the document."""
    try:
        if not isinstance(document, Mapping):
            raise TypeError("the server sent no document")
        resource = parse_resource(document, source=str(key))
    except ConfigError as err:
        _log.error(
            "leaving %s out of the mesh configuration: this agent cannot read it (%s); "
            "upgrade the agent to the server's version",
            key, "; ".join(str(error) for error in err.errors),
        )
        return None
    except TypeError as err:
        _log.error("leaving %s out of the mesh configuration: %s", key, err)
        return None
    if resource.key != key:
        _log.error("leaving %s out of the mesh configuration: its document names %s",
                   key, resource.key)
        return None
    return resource
