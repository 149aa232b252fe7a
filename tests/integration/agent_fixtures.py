"""Start real ``tessera agent run`` processes next to real servers, and act as workloads.

    from tests.integration.agent_fixtures import start_agent_fixture  # registers start_agent

    def test_x(server, start_agent):
        agent = start_agent(server, alias="spiffe://example.org/node/a")
        server.cli("entry", "create", "--parent-id", agent.alias, ...)

Workloads of other users are Python children that import py-spiffe as root
and then drop to the wanted uid/gid before they connect (the interpreter
lives under /root, which another uid cannot execute from), so the agent sees
exactly that uid in ``SO_PEERCRED``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import TESSERA, ServerProcess, free_port
from tests.support.processes import Process

START_DEADLINE = 20.0


def join_token(server: ServerProcess, alias: str) -> str:
    result = server.cli_json("token", "generate", "--spiffe-id", alias)
    return str(result["token"])


def save_bundle(server: ServerProcess, path: Path) -> Path:
    path.write_text(server.cli("bundle", "show").stdout)
    return path


@dataclass
class AgentProcess:
    servers: list[ServerProcess]
    data_dir: Path
    socket: Path
    alias: str
    trust_domain: str = "example.org"
    trust_bundle: Path | None = None
    health_port: int = field(default_factory=free_port)
    process: Process | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-agent.log"

    @property
    def endpoint(self) -> str:
        """The SPIFFE_ENDPOINT_SOCKET value for this agent."""
        return f"unix://{self.socket}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    def start(self, *, token: str | None = None, extra: tuple[str, ...] = ()) -> AgentProcess:
        args = [TESSERA, "agent", "run", "--trust-domain", self.trust_domain,
                "--data-dir", str(self.data_dir), "--socket", str(self.socket),
                "--health-bind", f"127.0.0.1:{self.health_port}"]
        for server in self.servers:
            args += ["--server", server.address]
        if token:
            args += ["--join-token", token]
        if self.trust_bundle is not None:
            args += ["--trust-bundle", str(self.trust_bundle)]
        self.process = Process.start("agent", [*args, *extra], log_path=self.log_path)
        self.process.wait_until(lambda: self.ready() or None, "answering /ready", START_DEADLINE)
        return self

    def ready(self) -> bool:
        try:
            return httpx.get(self.health_url + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.process = None

    def log(self) -> str:
        """The output of every run of this agent (a restart appends to it)."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A ``tessera agent ...`` client command against this agent's socket."""
        result = subprocess.run([TESSERA, "agent", *args, "--socket", str(self.socket)],
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(
                f"tessera agent {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\nagent log:\n{self.log()}"
            )
        return result


@pytest.fixture(name="socket_dir")
def socket_dir_fixture() -> Iterator[Path]:
    """A directory every uid can reach (pytest's tmp_path is 0700 under /tmp/pytest-of-root)."""
    directory = Path(tempfile.mkdtemp(prefix="tessera-agent-"))
    os.chmod(directory, 0o755)
    yield directory
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


@pytest.fixture(name="start_agent")
def start_agent_fixture(
    tmp_path: Path, socket_dir: Path
) -> Iterator[Callable[..., AgentProcess]]:
    """Start ``tessera agent run`` processes (joined with a fresh token); all stop afterwards."""
    started: list[AgentProcess] = []

    def start(server: ServerProcess, *, alias: str = "spiffe://example.org/node/a",
              name: str = "agent", servers: list[ServerProcess] | None = None) -> AgentProcess:
        bundle = save_bundle(server, tmp_path / f"{name}-bundle.pem")
        agent = AgentProcess(
            servers=servers or [server], data_dir=tmp_path / name,
            socket=socket_dir / f"{name}.sock", alias=alias, trust_bundle=bundle,
            trust_domain=server.trust_domain,
        )
        started.append(agent)
        return agent.start(token=join_token(server, alias))

    yield start
    for agent in started:
        agent.stop()


WORKLOAD = textwrap.dedent("""
    import json, os, sys
    import grpc
    from spiffe import WorkloadApiClient

    uid, gid, endpoint = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        with WorkloadApiClient(socket_path=endpoint, default_timeout=10) as client:
            svids = client.fetch_x509_svids()
        print(json.dumps({"spiffe_ids": [str(s.spiffe_id) for s in svids]}))
    except Exception as err:
        cause = err.__cause__
        code = cause.code().name if isinstance(cause, grpc.RpcError) else type(err).__name__
        print(json.dumps({"error": code, "message": str(err)}))
""")


def fetch_as(uid: int, gid: int, endpoint: str) -> dict[str, Any]:
    """What a process running as ``uid``/``gid`` gets from FetchX509SVID."""
    result = subprocess.run([sys.executable, "-c", WORKLOAD, str(uid), str(gid), endpoint],
                            capture_output=True, text=True, timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document
