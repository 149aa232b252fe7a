"""An Envoy configured by the agent of its node: what ``--proxy envoy`` sidecars and
``tessera gateway run`` have in common.

::

    envoy = AgentEnvoy(
        node_id="sidecar~host-1~orders~15006", node_cluster="orders",
        socket="unix:///run/tessera/agent.sock",
        metadata={"tessera.proxy": "sidecar", "tessera.service": "orders", ...},
        registry=metrics.registry, log_level="info", on_change=print_listeners,
    )
    await envoy.start()          # EnvoyMissing, EnvoyRefused (Envoy's words), ConfigError
    envoy.listeners              # active listeners, name -> address
    envoy.ready_problem()        # None once Envoy has its listeners from the agent, ACKed
    body = await envoy.prometheus_stats()
    await envoy.stop(grace=5.0)  # drains

The bootstrap (:func:`mesh.envoy.build_bootstrap`) says who the proxy is in its node
metadata (the keys of :mod:`workload_api.mesh_resources`) and names the agent's Unix
socket as the one xDS server: listeners, routes, clusters, endpoints over ADS, the SVID
and trust bundles over SDS. The agent attests the Envoy process by its own peer
credentials, so a registration entry must match Envoy too (``unix:uid`` does; a
``unix:path`` of the Python interpreter does not).

Envoy runs under :class:`~dataplane.envoy.EnvoySupervisor` (restarted if it dies,
drained on stop), its admin interface on a 0600 Unix socket in a private work directory:
``$XDG_RUNTIME_DIR/tessera-envoy/<kind>-<hash of the node id>`` (or the same under the
temporary directory, ``tessera-envoy-<uid>``), removed when Envoy is stopped, and kept
when the process dies, so that the Envoy it left behind is stopped by the next run.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry

from dataplane.envoy import EnvoyMetrics, EnvoySupervisor
from mesh.envoy import build_bootstrap
from sdk.privatefiles import prepare_private_dir

__all__ = ["AgentEnvoy", "default_work_root", "envoy_log_level", "host_name", "socket_path"]

UNIX_SCHEME: Final = "unix://"
_TESSERA_LOG_TO_ENVOY: Final = {
    "debug": "info", "info": "warning", "warning": "warning", "error": "error",
}  # fmt: skip


def envoy_log_level(level: str) -> str:
    """Envoy's log level for the process's ``--log-level`` (Envoy's info is its start-up
    story; it shows from ``debug`` on)."""
    return _TESSERA_LOG_TO_ENVOY.get(level, "warning")


def host_name() -> str:
    return socket.gethostname() or "localhost"


def socket_path(address: str) -> str:
    """The agent socket's absolute path from a Workload API address (``unix:///path``)."""
    path = address[len(UNIX_SCHEME) :] if address.startswith(UNIX_SCHEME) else address
    if not path.startswith("/"):
        path = str(Path(path).resolve())
    return path


class AgentEnvoy:
    def __init__(
        self,
        *,
        node_id: str,
        node_cluster: str,
        socket: str,
        metadata: Mapping[str, str],
        registry: CollectorRegistry,
        log_level: str = "warning",
        on_change: Callable[[], None] | None = None,
        before_start: Callable[[], None] | None = None,
        work_root: Path | None = None,
    ) -> None:
        self.node_id = node_id
        kind = metadata.get("tessera.proxy", "proxy")
        bootstrap = build_bootstrap(
            node_id=node_id, node_cluster=node_cluster, agent_socket=socket_path(socket),
            admin_port=0, metadata=metadata,
        )  # fmt: skip
        digest = hashlib.sha256(node_id.encode()).hexdigest()[:12]
        self._root = work_root or default_work_root()
        self.supervisor = EnvoySupervisor(
            bootstrap,
            work_dir=self._root / f"{kind}-{digest}",
            log_level=log_level,
            metrics=EnvoyMetrics(registry),
            on_readiness=on_change,
            keep_work_dir=False,
            before_start=before_start,
        )

    @property
    def listeners(self) -> Mapping[str, str]:
        return self.supervisor.listeners

    @property
    def pid(self) -> int | None:
        return self.supervisor.pid

    @property
    def admin_socket(self) -> Path:
        return self.supervisor.work_dir / "admin.sock"

    async def start(self) -> None:
        prepare_private_dir(self._root, what="Envoy's directory")
        await self.supervisor.start()

    def ready_problem(self) -> str | None:
        return self.supervisor.ready_problem()

    def failure(self) -> str | None:
        return self.supervisor.failure

    async def prometheus_stats(self) -> bytes:
        return await self.supervisor.prometheus_stats()

    async def stop(self, grace: float) -> None:
        """Drain and stop Envoy; its work directory goes with it."""
        await self.supervisor.stop(grace)


def default_work_root() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "tessera-envoy"
    return Path(tempfile.gettempdir()) / f"tessera-envoy-{os.getuid()}"
