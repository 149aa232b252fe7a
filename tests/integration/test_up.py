"""``tessera up`` as a newcomer runs it: one process, then the Workload API in another shell.

The time from starting the process to the first X509-SVID is printed (run
with ``-s`` to see it), not asserted: it depends on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spiffe import TrustDomain, WorkloadApiClient

from tessera.up import login_name, user_spiffe_id
from tests.integration.conftest import TESSERA, tessera

DEADLINE = 30.0
USER_ID = str(user_spiffe_id(TrustDomain("example.org"), os.getuid(), login_name(os.getuid())))


@dataclass
class UpProcess:
    data_dir: Path
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[str] = field(init=False)
    began: float = field(init=False)

    @property
    def socket(self) -> Path:
        return self.data_dir.absolute() / "agent" / "agent.sock"

    @property
    def stdout_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-up.out"

    @property
    def stderr_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-up.err"

    def start(self) -> UpProcess:
        self.began = time.monotonic()
        with self.stdout_path.open("w") as out, self.stderr_path.open("a") as err:
            self.process = subprocess.Popen(
                [TESSERA, "up", "--data-dir", str(self.data_dir), *self.extra],
                stdout=out, stderr=err, text=True,
            )
        return self

    def wait_for_socket(self) -> None:
        while time.monotonic() - self.began < DEADLINE:
            assert self.process.poll() is None, f"tessera up exited:\n{self.log()}"
            if self.socket.exists():
                return
            time.sleep(0.02)
        raise AssertionError(f"no Workload API socket in {DEADLINE}s:\n{self.log()}")

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def log(self) -> str:
        return f"stdout:\n{self.stdout()}\nstderr:\n{self.stderr_path.read_text()}"

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"tessera up did not stop on SIGTERM:\n{self.log()}") from None


def fetch_x509(socket: Path) -> dict[str, Any]:
    """``tessera agent api fetch x509``, retried until it answers (the socket may be
    bound a moment before the first SVID is cached)."""
    while True:
        result = tessera("agent", "api", "fetch", "x509", "--socket", str(socket),
                         "--output", "json", check=False)
        if result.returncode == 0:
            document: dict[str, Any] = json.loads(result.stdout)
            return document
        time.sleep(0.05)


def admin(data_dir: Path, *args: str) -> dict[str, Any]:
    result = tessera("server", *args, "--data-dir", str(data_dir / "server"), "--output", "json")
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_up_gives_the_caller_an_svid_and_a_restart_reuses_everything(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "up").start()
    try:
        up.wait_for_socket()
        fetched = fetch_x509(up.socket)
        first_svid = time.monotonic() - up.began
        print(f"\ntessera up: first X509-SVID via 'tessera agent api fetch x509' "
              f"{first_svid:.2f}s after start")

        assert [s["spiffe_id"] for s in fetched["svids"]] == [USER_ID]
        with WorkloadApiClient(socket_path=f"unix://{up.socket}", default_timeout=10) as client:
            assert str(client.fetch_x509_svid().spiffe_id) == USER_ID
        assert f"export SPIFFE_ENDPOINT_SOCKET=unix://{up.socket}" in up.stdout()
        assert f"you        {USER_ID}   (unix:uid:{os.getuid()})" in up.stdout()
        agents = admin(up.data_dir, "agent", "list")["agents"]
        assert len(agents) == 1
        assert agents[0]["spiffe_id"].startswith("spiffe://example.org/tessera/agent/join_token/")
        assert admin(up.data_dir, "healthcheck")["status"] == "serving"
    finally:
        code = up.terminate()
    assert code == 0, up.log()
    assert not up.socket.exists()
    assert "Stopped." in up.stderr_path.read_text()

    again = UpProcess(up.data_dir, ("--output", "json")).start()
    try:
        again.wait_for_socket()
        assert [s["spiffe_id"] for s in fetch_x509(again.socket)["svids"]] == [USER_ID]
        # The same agent, not attested again (when it last synced is this run's news).
        def kept(found: list[dict[str, object]]) -> list[dict[str, object]]:
            return [{k: v for k, v in agent.items() if k != "last_seen"} for agent in found]

        assert kept(admin(again.data_dir, "agent", "list")["agents"]) == kept(agents)
        assert admin(again.data_dir, "entry", "count")["count"] == 1
        document = json.loads(again.stdout())
    finally:
        assert again.terminate() == 0, again.log()

    assert document["spiffe_id"] == USER_ID
    assert document["socket"] == str(up.socket)
    assert document["export"] == f"export SPIFFE_ENDPOINT_SOCKET=unix://{up.socket}"
    assert document["agent_id"] == agents[0]["spiffe_id"]
    assert document["server_data_dir"] == str(up.data_dir.absolute() / "server")
    assert document["agent_data_dir"] == str(up.data_dir.absolute() / "agent")
    host, _, port = document["server_address"].rpartition(":")
    assert host == "127.0.0.1" and port.isdigit()


def test_a_second_up_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "up").start()
    try:
        up.wait_for_socket()
        refused = tessera("up", "--data-dir", str(up.data_dir), check=False)
    finally:
        assert up.terminate() == 0, up.log()

    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (
        f"Error: tessera up is already running with the data dir {up.data_dir} "
        f"({up.data_dir / 'server' / 'admin.sock'} answers); stop it first or pass another "
        "--data-dir"
    )
