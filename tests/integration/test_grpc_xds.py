"""gRPC's own xDS client (proxyless) resolves ``xds:///users-service`` through a real agent
and calls a healthy instance over mTLS, with no proxy on the caller's side.

    caller (grpcio, XdsCredentials,       ──xDS: LDS, CDS, EDS──▶  tessera agent
     file_watcher over the files of                                 (its Unix socket)
     `tessera sidecar files`, SVID web)
            │ mTLS (h2), the peer must be spiffe://example.org/users
            ▼
    Envoy, the sidecar of users-service   ──SDS, ADS──▶  the same agent
     (inbound: mTLS, RBAC: web allowed)
            │ h2c
            ▼
    a gRPC server (a generic handler answering with the caller Envoy saw)

The instance is registered the way ``tessera sidecar run`` registers one (the agent's
``Mesh.Register``, :class:`dataplane.registration.InstanceRegistration`), from this test
process, which holds the users SVID: the built-in proxy speaks HTTP/1.1 only, so the
sidecar here is Envoy, started with the bootstrap ``mesh.envoy.build_bootstrap`` writes.
The caller runs in its own process (gRPC reads ``GRPC_XDS_BOOTSTRAP`` once per process).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest

from dataplane.registration import InstanceRegistration
from mesh.envoy import build_bootstrap
from sdk.address import HostPort
from tests.integration.agent_fixtures import (  # noqa: F401  (the fixtures register by import)
    AgentProcess,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import TESSERA, ServerProcess, free_port, tessera
from tests.integration.test_agent import NODE, create_entry
from tests.support.envoy import EnvoyProcess
from tests.support.processes import Process, poll
from tests.unit.mesh.meshes import EVERYTHING
from tests.unit.mesh.test_envoy_render import ORDERS_ROUTES
from tests.unit.workload_api.test_server import LoopThread

pytestmark = [pytest.mark.integration, pytest.mark.envoy]

USERS = "spiffe://example.org/users"
WEB = "spiffe://example.org/web"
INTRUDER = "spiffe://example.org/intruder"
IMPOSTOR = "spiffe://example.org/impostor"
PORT = 50051
DEADLINE = 20.0
StartAgent = Callable[..., AgentProcess]

MESH = f"""\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {{name: users-service}}
spec:
  spiffeIds: [{USERS}]
  ports: [{{number: {PORT}, name: grpc, protocol: GRPC}}]
  healthCheck: {{tcp: {{}}, interval: 1s}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: users-allow-web}}
spec:
  selector: {{matchLabels: {{app: users}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["{WEB}"]}}
"""

CALLER = textwrap.dedent("""
    import json, sys
    import grpc
    import grpc.experimental

    target, deadline, wait_for_ready = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "wait"
    credentials = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
    with grpc.secure_channel(target, credentials) as channel:
        who = channel.unary_unary("/tessera.test.Users/Who")
        try:
            answer = who(b"", timeout=deadline, wait_for_ready=wait_for_ready)
        except grpc.RpcError as err:
            print(json.dumps({"error": err.code().name, "details": err.details()}))
        else:
            print(json.dumps({"caller": answer.decode()}))
""")

RESOLVER = textwrap.dedent("""
    import json, sys, threading
    import grpc
    import grpc.experimental

    deadline, targets = float(sys.argv[1]), sys.argv[2:]
    credentials = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
    settled, lock, done = {}, threading.Lock(), threading.Event()
    final = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)

    def watch(target):
        def seen(state):
            with lock:
                if state in final:
                    settled.setdefault(target, state.name)
                if len(settled) == len(targets):
                    done.set()
        return seen

    channels = [grpc.secure_channel(target, credentials) for target in targets]
    for target, channel in zip(targets, channels):
        channel.subscribe(watch(target), try_to_connect=True)
    done.wait(deadline)
    print(json.dumps(settled))
""")


# -- the server side: a gRPC app, its Envoy sidecar, its registration ------------------------


def _who(request: bytes, context: Any) -> bytes:
    """The caller's SPIFFE ID as the sidecar wrote it in a header."""
    metadata = dict(context.invocation_metadata())
    return str(metadata.get("x-forwarded-client-spiffe-id", "")).encode()


@pytest.fixture
def app() -> Iterator[int]:
    """A gRPC server with no proto: one generic method; its port."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "tessera.test.Users", {"Who": grpc.unary_unary_rpc_method_handler(_who)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(grace=None)


def envoy_sidecar(
    agent: AgentProcess, directory: Path, inbound: int, app: int, spiffe_id: str = USERS
) -> EnvoyProcess:
    document = build_bootstrap(
        node_id="users-1", node_cluster="users-service", agent_socket=str(agent.socket),
        admin_port=0, metadata={
            "tessera.proxy": "sidecar",
            "tessera.service": "users-service",
            "tessera.spiffe_id": spiffe_id,
            "tessera.labels": json.dumps({"app": "users"}),
            "tessera.inbound": f"127.0.0.1:{inbound}",
            "tessera.app": f"127.0.0.1:{app}",
            "tessera.outbound": f"127.0.0.1:{free_port()}",
        },
    )  # fmt: skip
    return EnvoyProcess.start(directory, document, name="users-envoy")


def register(loop: LoopThread, agent: AgentProcess, inbound: int, app: int) -> None:
    registration = InstanceRegistration(
        socket=str(agent.socket), service="users-service", spiffe_id=USERS,
        address=HostPort("127.0.0.1", inbound), check_address=HostPort("127.0.0.1", app),
        labels={"app": "users"},
    )  # fmt: skip
    asyncio.run_coroutine_threadsafe(registration.run(), loop.loop)


def healthy_instance(server: ServerProcess, address: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        listed = json.loads(tessera("mesh", "services", "--output", "json", "--data-dir",
                                    str(server.data_dir)).stdout)  # fmt: skip
        return next((i for i in listed if i["address"] == address
                     and i["health"] == "healthy"), None)  # fmt: skip

    return poll(found, DEADLINE, f"an instance at {address} healthy in tessera mesh services")


# -- the caller: files, a bootstrap, grpcio in its own process -------------------------------


def svid_files(agent: AgentProcess, directory: Path, spiffe_id: str) -> Process:
    files = directory / "svid"
    process = Process.start(
        "sidecar-files",
        [TESSERA, "sidecar", "files", "--dir", str(files), "--socket", agent.endpoint,
         "--spiffe-id", spiffe_id, "--health-bind", "0"],
        log_path=directory / "sidecar-files.log",
    )  # fmt: skip
    process.wait_until(lambda: (files / "svid.key").exists() or None, "writing the SVID files",
                       DEADLINE)  # fmt: skip
    return process


def grpc_bootstrap(agent: AgentProcess, files: Path, spiffe_id: str) -> dict[str, Any]:
    """gRPC's xDS bootstrap: the agent's socket, the node, the SVID files (gRFC A29)."""
    return {
        "xds_servers": [{
            "server_uri": f"unix://{agent.socket}",
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": f"{spiffe_id.rsplit('/', 1)[-1]}-1",
            "cluster": spiffe_id.rsplit("/", 1)[-1],
            "metadata": {"tessera.proxy": "grpc", "tessera.spiffe_id": spiffe_id},
        },
        "certificate_providers": {
            "tessera": {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": str(files / "svid.pem"),
                    "private_key_file": str(files / "svid.key"),
                    "ca_certificate_file": str(files / "bundle.pem"),
                    "refresh_interval": "1s",
                },
            }
        },
    }  # fmt: skip


def call(
    directory: Path, bootstrap: dict[str, Any], target: str, *, wait_for_ready: bool = True
) -> dict[str, Any]:
    """Call ``target`` from a new process with this gRPC bootstrap; what it got. Without
    ``wait_for_ready`` the call fails as soon as the channel cannot connect."""
    wait = "wait" if wait_for_ready else "fail"
    return _run(directory, bootstrap, CALLER, target, str(DEADLINE), wait)


def resolve(directory: Path, bootstrap: dict[str, Any], *targets: str) -> dict[str, Any]:
    """Open a channel to each target in a new process, until each has resolved (READY, or
    TRANSIENT_FAILURE: no instance to connect to); target -> that state."""
    return _run(directory, bootstrap, RESOLVER, str(DEADLINE), *targets)


def _run(directory: Path, bootstrap: dict[str, Any], script: str, *args: str) -> dict[str, Any]:
    path = directory / "grpc-bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=DEADLINE + 30, cwd="/",
        env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


# -- the scenario -------------------------------------------------------------------------------


def access_log(envoy: EnvoyProcess, path: str, *, count: int) -> list[dict[str, Any]] | None:
    """The sidecar's access log lines (JSON, on Envoy's stdout) for requests to ``path``,
    once there are ``count`` of them."""
    lines = [line for line in envoy.log().splitlines() if line.startswith("{")]
    found = [entry for entry in map(json.loads, lines) if entry.get("path") == path]
    return found if len(found) == count else None


def test_a_proxyless_grpc_client_resolves_an_xds_target_and_calls_over_mtls(
    server: ServerProcess, start_agent: StartAgent, app: int, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    tessera("mesh", "apply", "-f", "-", "--data-dir", str(server.data_dir), input=MESH)
    for spiffe_id in (USERS, WEB, INTRUDER):
        create_entry(server, spiffe_id, f"unix:uid:{os.getuid()}", parent=NODE)
    monkeypatch.setenv("TESSERA_LOG_LEVEL", "debug")  # the agent logs each ACK
    agent = start_agent(server)
    inbound = free_port()
    loop = LoopThread()
    web, intruder = tmp_path / "web", tmp_path / "intruder"
    web.mkdir()
    intruder.mkdir()
    files = [svid_files(agent, web, WEB), svid_files(agent, intruder, INTRUDER)]
    try:
        with envoy_sidecar(agent, tmp_path, inbound, app) as envoy:
            register(loop, agent, inbound, app)
            healthy_instance(server, f"127.0.0.1:{inbound}")

            allowed = call(web, grpc_bootstrap(agent, web / "svid", WEB), "xds:///users-service")
            refused = call(intruder, grpc_bootstrap(agent, intruder / "svid", INTRUDER),
                           "xds:///users-service:50051")  # fmt: skip
            [seen_allowed, seen_refused] = envoy.wait_until(
                lambda: access_log(envoy, "/tessera.test.Users/Who", count=2),
                "both calls in the sidecar's access log",
            )
    finally:
        for process in files:
            process.stop()
        loop.stop()
    log = agent.log()
    assert allowed == {"caller": WEB}, log
    assert (seen_allowed["source"], seen_allowed["protocol"], seen_allowed["response_code"],
            seen_allowed["upstream_cluster"]) == (
        WEB, "HTTP/2", 200, f"inbound|{PORT}||users-service")  # fmt: skip
    assert refused["error"] == "PERMISSION_DENIED", refused
    assert (seen_refused["source"], seen_refused["upstream_host"]) == (INTRUDER, None)
    assert seen_refused["response_code_details"].startswith("rbac_access_denied")
    for node in ("web-1", "intruder-1"):
        # a client ACKs on its discovery stream while its call goes out on another: the ACK
        # may reach the agent's log after the answer, so wait for it
        poll(partial(accepted_every_type, agent, node), DEADLINE, f"{node} ACKing every type")
        assert refusals(agent, node) == []


def test_the_client_refuses_an_instance_that_presents_another_spiffe_id(
    server: ServerProcess, start_agent: StartAgent, app: int, tmp_path: Path,
) -> None:  # fmt: skip
    """The cluster's SAN match: an instance registered under the Service's SPIFFE ID
    whose sidecar presents another SVID is not called (gRFC A29, checked by the client)."""
    tessera("mesh", "apply", "-f", "-", "--data-dir", str(server.data_dir), input=MESH)
    for spiffe_id in (USERS, WEB, IMPOSTOR):
        create_entry(server, spiffe_id, f"unix:uid:{os.getuid()}", parent=NODE)
    agent = start_agent(server)
    inbound = free_port()
    loop = LoopThread()
    files = svid_files(agent, tmp_path, WEB)
    try:
        with envoy_sidecar(agent, tmp_path, inbound, app, spiffe_id=IMPOSTOR) as envoy:
            register(loop, agent, inbound, app)
            healthy_instance(server, f"127.0.0.1:{inbound}")
            answer = call(tmp_path, grpc_bootstrap(agent, tmp_path / "svid", WEB),
                          "xds:///users-service", wait_for_ready=False)  # fmt: skip
            log = envoy.log()
    finally:
        files.stop()
        loop.stop()
    assert answer.get("error") == "UNAVAILABLE", answer
    assert "SANs from certificate did not match SANs from xDS control plane" in answer["details"]
    assert "/tessera.test.Users/Who" not in log  # no request reached the sidecar
    assert refusals(agent, "web-1") == []


XDS_TYPES = ("listener.v3.Listener", "cluster.v3.Cluster", "endpoint.v3.ClusterLoadAssignment")


def said_to(agent: AgentProcess, node: str) -> list[str]:
    """The agent's log lines about the discovery stream of ``node``."""
    return [line for line in agent.log().splitlines() if f"Envoy node {node} (cluster " in line]


def accepted_every_type(agent: AgentProcess, node: str) -> bool | None:
    """True once ``node`` has ACKed listeners, clusters and endpoints (None before: poll it)."""
    said = said_to(agent, node)
    return all(
        any(f" accepted type.googleapis.com/envoy.config.{kind} " in line for line in said)
        for kind in XDS_TYPES
    ) or None


def refusals(agent: AgentProcess, node: str) -> list[str]:
    """What ``node`` refused (NACK), with gRPC's reason."""
    return [line for line in said_to(agent, node) if " refused " in line]


def test_grpc_accepts_every_route_and_cluster_the_mesh_renders_for_it(
    server: ServerProcess, start_agent: StartAgent, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Weighted subsets, header, method and query matches, redirects, rewrites, header
    changes, timeouts, retries, faults, mirrors, consistent hashing, circuit breakers and
    outlier detection: gRPC takes what it supports and ignores the rest; it refuses none."""
    documents = "---\n".join([*EVERYTHING, ORDERS_ROUTES])
    tessera("mesh", "apply", "-f", "-", "--data-dir", str(server.data_dir), input=documents)
    create_entry(server, WEB, f"unix:uid:{os.getuid()}", parent=NODE)
    monkeypatch.setenv("TESSERA_LOG_LEVEL", "debug")  # the agent logs each ACK
    agent = start_agent(server)
    files = svid_files(agent, tmp_path, WEB)
    try:
        targets = ["xds:///orders", "xds:///reviews:9080", "xds:///users-service"]
        settled = resolve(tmp_path, grpc_bootstrap(agent, tmp_path / "svid", WEB), *targets)
    finally:
        files.stop()
    # No instance is registered: each channel resolves and finds none to connect to.
    assert settled == dict.fromkeys(targets, "TRANSIENT_FAILURE"), agent.log()
    poll(partial(accepted_every_type, agent, "web-1"), DEADLINE,
         "web-1 accepting listeners, clusters and endpoints")  # fmt: skip
    assert refusals(agent, "web-1") == []
