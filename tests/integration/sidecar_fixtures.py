"""A real trust domain for the sidecar and example tests, and ``tessera sidecar`` processes.

    with trust_domain(tmp_path, [Entry("spiffe://example.org/web", ttl=10)]) as domain:
        proxy = start_tessera(domain, tmp_path, "web-proxy", "sidecar", "proxy", "--config", p)
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
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ca.admin_client import AdminClient
from tests.integration.agent_fixtures import AgentProcess
from tests.integration.conftest import TESSERA, ServerProcess, free_port

T = TypeVar("T")

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


@dataclass
class TesseraProcess:
    """A long-running ``tessera ...`` (or other) process, its stderr and stdout in files."""

    name: str
    args: list[str]
    directory: Path
    env: dict[str, str]
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    stdout_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.directory / f"{self.name}.log"
        self.stdout_path = self.directory / f"{self.name}.out"

    def start(self) -> TesseraProcess:
        with self.log_path.open("ab") as log, self.stdout_path.open("ab") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=log, env=self.env,
                                            cwd=self.cwd)  # fmt: skip
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def wait_for(self, text: str, deadline: float = 20.0, *, in_stdout: bool = False) -> None:
        def seen() -> bool | None:
            self.check_running()
            return True if text in (self.stdout() if in_stdout else self.log()) else None

        poll(seen, deadline, f"{text!r} from {self.name}")

    def check_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"{self.name} exited {self.process.returncode}:\n{self.log()}\n{self.stdout()}"
            )

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def processes() -> Iterator[Callable[..., TesseraProcess]]:
    """Start processes with the returned function; all are stopped at the end (reverse order)."""
    started: list[TesseraProcess] = []

    def start(name: str, args: Sequence[str], *, directory: Path, env: dict[str, str],
              cwd: Path | None = None) -> TesseraProcess:  # fmt: skip
        process = TesseraProcess(name, list(args), directory, env, cwd).start()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in reversed(started):
            process.stop()


def tessera_args(*args: str) -> list[str]:
    return [TESSERA, *args]


def poll(check: Callable[[], T | None], deadline: float, what: str) -> T:
    """Call ``check`` until it returns something, or fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    last_error: Exception | None = None
    while time.monotonic() < end:
        try:
            value = check()
        except AssertionError:
            raise
        except Exception as err:  # not there yet
            last_error = err
            value = None
        if value is not None:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {deadline}s (last error: {last_error})")


def wait_for_port(port: int, deadline: float = 20.0, *, process: TesseraProcess | None = None
                  ) -> None:  # fmt: skip
    def listening() -> bool | None:
        if process is not None:
            process.check_running()
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    poll(listening, deadline, f"a listener on port {port}")
