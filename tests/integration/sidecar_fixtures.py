"""A real trust domain for the sidecar and example tests, and ``tessera sidecar`` processes
(``tests/support/processes.py``).

    with trust_domain(tmp_path, [Entry("spiffe://example.org/web", ttl=10)]) as domain, \
            processes() as start:
        proxy = start("web-proxy", tessera_args("sidecar", "proxy", "--config", str(p)),
                      directory=tmp_path, env=domain.env())
        proxy.wait_for("Sidecar proxy is ready")

One ``tessera server run`` and one ``tessera agent run`` per test module (they
take a few seconds to start); every entry selects this test process's uid, so
this process and every child it starts gets all the SVIDs, and each sidecar
picks its own with ``--spiffe-id`` / ``spiffe_id``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ca.admin_client import AdminClient
from tests.integration.agent_fixtures import AgentProcess
from tests.integration.conftest import TESSERA, ServerProcess, free_port
from tests.support.processes import Process, poll

UID = os.getuid()
ALIAS = "spiffe://example.org/node/sidecar-tests"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)


@dataclass(frozen=True)
class Entry:
    spiffe_id: str
    ttl: int | None = None
    """X509-SVID TTL in seconds."""
    dns: tuple[str, ...] = ()


@dataclass
class TrustDomain:
    server: ServerProcess
    agent: AgentProcess

    @property
    def endpoint(self) -> str:
        return self.agent.endpoint

    def env(self) -> dict[str, str]:
        return {**os.environ, "SPIFFE_ENDPOINT_SOCKET": self.agent.endpoint}

    def admin(self) -> AdminClient:
        """The admin API, straight from this process (a CLI run per call costs half a second)."""
        return AdminClient(self.server.admin_socket)

    def create_entry(self, entry: Entry) -> str:
        body: dict[str, object] = {"parent_id": ALIAS, "spiffe_id": entry.spiffe_id,
                                   "selectors": [f"unix:uid:{UID}"]}
        if entry.ttl:
            body["x509_svid_ttl"] = entry.ttl
        if entry.dns:
            body["dns_names"] = list(entry.dns)
        return str(self.admin().post("/v1/entries", json=body)["id"])


@contextlib.contextmanager
def trust_domain(directory: Path, entries: Sequence[Entry]) -> Iterator[TrustDomain]:
    """A server and an agent, with ``entries`` created (in order: the first is the workload's
    default SVID) before the agent starts."""
    server = ServerProcess(data_dir=directory / "server", port=free_port())
    agent: AgentProcess | None = None
    try:
        server.start()
        bundle = directory / "bundle.pem"
        bundle.write_bytes(AdminClient(server.admin_socket).get(
            "/v1/bundle", params={"format": "pem"}, raw=True))  # fmt: skip
        agent = AgentProcess(servers=[server], data_dir=directory / "agent",
                             socket=directory / "agent.sock", alias=ALIAS, trust_bundle=bundle)
        domain = TrustDomain(server, agent)
        for entry in entries:
            domain.create_entry(entry)
        token = domain.admin().post("/v1/tokens", json={"spiffe_id": ALIAS, "ttl": 600})
        agent.start(token=str(token["token"]))
        yield domain
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


@contextlib.contextmanager
def processes() -> Iterator[Callable[..., Process]]:
    """Start processes with the returned function (``name``'s stderr in ``<name>.log`` and
    stdout in ``<name>.out`` under ``directory``); all are stopped at the end, in reverse
    order."""
    started: list[Process] = []

    def start(name: str, args: Sequence[str], *, directory: Path, env: dict[str, str],
              cwd: Path | None = None) -> Process:  # fmt: skip
        process = Process.start(name, args, log_path=directory / f"{name}.log",
                                stdout_path=directory / f"{name}.out", env=env, cwd=cwd)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in reversed(started):
            process.stop()


def tessera_args(*args: str) -> list[str]:
    return [TESSERA, *args]


def wait_for_port(port: int, deadline: float = 20.0, *, process: Process | None = None) -> None:
    def listening() -> bool | None:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    what = f"a listener on port {port}"
    if process is None:
        poll(listening, deadline, what)
    else:
        process.wait_until(listening, what, deadline)
