"""Start real ``tessera`` processes from the CLI, the way a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from sdk.address import unused_port
from tests.support.processes import Process

TESSERA = shutil.which("tessera", path=str(Path(sys.executable).parent)) or "tessera"
START_DEADLINE = 20.0


def free_port() -> int:
    """A port for a process the test starts to listen on (outside the ephemeral range)."""
    return unused_port()


def tessera(*args: str, check: bool = True, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one ``tessera`` command and return its result."""
    result = subprocess.run(
        [TESSERA, *args], capture_output=True, text=True, timeout=60, input=input,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"tessera {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


@dataclass
class ServerProcess:
    data_dir: Path
    port: int
    trust_domain: str = "example.org"
    db: str | None = None
    extra: Sequence[str] = ()
    process: Process | None = None
    log_path: Path = field(init=False)
    started_in: float = 0.0

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "admin.sock"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        args = [TESSERA, "server", "run", "--trust-domain", self.trust_domain,
                "--data-dir", str(self.data_dir), "--bind", self.address, *self.extra]
        if self.db:
            args += ["--db", self.db]
        began = time.monotonic()
        self.process = Process.start("server", args, log_path=self.log_path)
        self.process.wait_until(lambda: self.healthy() or None, "answering /v1/health",
                                START_DEADLINE)  # fmt: skip
        self.started_in = time.monotonic() - began
        return self

    def healthy(self) -> bool:
        if not self.admin_socket.exists():
            return False
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.admin_socket)),
                              base_url="http://tessera", timeout=2) as client:
                return client.get("/v1/health").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.process = None

    def log(self) -> str:
        """The output of every run of this server (a restart appends to it)."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True, input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """A ``tessera server ...`` admin command against this server."""
        return tessera("server", *args, "--data-dir", str(self.data_dir), check=check,
                       input=input)

    def cli_json(self, *args: str) -> dict[str, object]:
        result = self.cli(*args, "--output", "json")
        data: dict[str, object] = json.loads(result.stdout)
        return data


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[object]:
    """Start ``tessera server run`` processes; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(name: str = "server", **kwargs: object) -> ServerProcess:
        server = ServerProcess(data_dir=tmp_path / name, port=free_port(), **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: object) -> ServerProcess:
    return start_server()  # type: ignore[operator, no-any-return]
