"""What a newcomer meets first, driven with real ``tessera`` processes.

- admin commands run by a user who cannot open the admin socket, or with no
  server there, say so in a sentence;
- ``tessera init`` writes an agent.toml whose socket other users' workloads
  can reach;
- admin commands run next to ``tessera up`` find its server;
- a selector type no workload attestor knows is accepted with a warning.

Tests run as root; another user is ``nobody``, via ``setpriv``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import TESSERA, ServerProcess, free_port, tessera
from tests.integration.test_up import UpProcess
from tests.support.processes import Process

pytestmark = pytest.mark.integration
NOBODY = pwd.getpwnam("nobody")
AS_NOBODY = ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}",
             "--clear-groups"]
DEADLINE = 20.0


def tessera_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_NOBODY, TESSERA, *args], capture_output=True, text=True,
                          timeout=60, cwd="/")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every uid can reach (pytest's tmp_path is 0700 under /tmp/pytest-of-root)."""
    directory = Path(tempfile.mkdtemp(prefix="tessera-init-"))
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# -- the admin socket ---------------------------------------------------------------------


def test_a_user_who_cannot_open_the_admin_socket_is_told_what_to_do(
    server: ServerProcess,
) -> None:
    for args in (("entry", "show"), ("healthcheck",), ("bundle", "show")):
        result = tessera_as_nobody("server", *args, "--admin-socket", str(server.admin_socket))

        assert result.returncode == 1, result
        assert result.stdout == ""
        assert result.stderr == (
            f"Error: permission denied on the admin socket {server.admin_socket}; run the "
            "command as the user the server runs as, or pass --admin-socket PATH of a socket "
            "you may open\n"
        )


def test_a_user_who_cannot_read_the_data_dir_is_told_about_the_socket() -> None:
    """The data dir is 0700 under a directory anyone may pass: the command names the socket
    and the reason, not click's 'Directory ... is not readable' about --data-dir."""
    parent = Path(tempfile.mkdtemp(prefix="tessera-server-"))
    os.chmod(parent, 0o755)  # traversable, as /var/lib is
    server = ServerProcess(data_dir=parent / "server", port=free_port())
    try:
        server.start()
        result = tessera_as_nobody("server", "entry", "show", "--data-dir",
                                   str(server.data_dir))
    finally:
        server.stop()
        shutil.rmtree(parent)

    assert result.returncode == 1, result
    assert result.stderr == (
        f"Error: permission denied on the admin socket {server.admin_socket}; run the "
        "command as the user the server runs as, or pass --admin-socket PATH of a socket "
        "you may open\n"
    )


def test_no_server_and_a_dead_socket_are_told_apart(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "admin.sock"
    result = tessera("server", "entry", "show", "--data-dir", str(missing.parent), check=False)
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: no admin socket at {missing} (not found): is the server running? "
        "'tessera server run' listens on <data-dir>/admin.sock; pass --data-dir DIR or "
        "--admin-socket PATH\n"
    )

    dead = tmp_path / "dead.sock"  # a socket file nobody listens on, as a killed server leaves
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(dead))
    result = tessera("server", "entry", "count", "--admin-socket", str(dead), check=False)
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: the admin socket {dead} refused the connection: is the server running? "
        "It listens there while it runs; start it with 'tessera server run', or pass "
        "--admin-socket PATH\n"
    )


# -- tessera init: a workload of another user gets its SVID --------------------------------


def test_a_workload_of_another_user_fetches_its_svid_from_an_init_agent(
    shared_dir: Path,
) -> None:
    tessera("init", "--trust-domain", "example.org", "--dir", str(shared_dir))
    server_file, agent_file = shared_dir / "server.toml", shared_dir / "agent.toml"
    server_settings = tomllib.loads(server_file.read_text())
    agent_settings = tomllib.loads(agent_file.read_text())

    server_dir = Path(server_settings["data_dir"])
    server_dir.parent.mkdir(exist_ok=True)  # where ServerProcess keeps its log
    server = ServerProcess(data_dir=server_dir, port=free_port(),
                           extra=("--config", str(server_file)))
    server.start()
    agent = None
    try:
        bundle = Path(agent_settings["trust_bundle"])
        bundle.write_text(server.cli("bundle", "show").stdout)
        alias = "spiffe://example.org/node/init"
        token = json.loads(server.cli("token", "generate", "--spiffe-id", alias,
                                      "--output", "json").stdout)["token"]
        server.cli("entry", "create", "--parent-id", alias,
                   "--spiffe-id", "spiffe://example.org/nobody",
                   "--selector", f"unix:uid:{NOBODY.pw_uid}")
        health = free_port()
        agent = Process.start(
            "agent",
            [TESSERA, "agent", "run", "--config", str(agent_file), "--join-token", token,
             "--server", server.address, "--health-bind", f"127.0.0.1:{health}"],
            log_path=shared_dir / "agent.log")
        ready = f"http://127.0.0.1:{health}/ready"
        agent.wait_until(lambda: httpx.get(ready, timeout=2).status_code == 200 or None,
                         "answering /ready", DEADLINE)  # fmt: skip

        # nobody reads agent.toml for the socket, as the init README tells a workload to.
        result = tessera_as_nobody("agent", "api", "fetch", "x509", "--config", str(agent_file),
                                   "--output", "json")
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        assert [s["spiffe_id"] for s in document["svids"]] == ["spiffe://example.org/nobody"]
        socket_dir = Path(agent_settings["socket"]).parent
        assert socket_dir.stat().st_mode & 0o777 == 0o755
        assert Path(agent_settings["data_dir"]).stat().st_mode & 0o777 == 0o700
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=15)
        server.stop()


def test_a_workload_that_cannot_reach_the_socket_is_told_why(tmp_path: Path) -> None:
    # An agent's socket inside root's private tmp_path, as the old agent.toml of init put it.
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        result = tessera_as_nobody("agent", "api", "fetch", "x509", "--socket", str(path))
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: permission denied on the Workload API socket {path}: a directory on the way "
        f"is closed to uid {NOBODY.pw_uid}; serve the socket where every workload can reach "
        "it ('socket' in agent.toml), or pass --socket\n"
    )


def test_init_warns_when_other_users_cannot_reach_the_socket(tmp_path: Path) -> None:
    # tmp_path sits in root's private /tmp/pytest-of-root: no other uid can get through.
    result = tessera("init", "--trust-domain", "example.org", "--dir", str(tmp_path / "td"))
    blocked = next(p for p in reversed((tmp_path / "td").parents) if not p.stat().st_mode & 0o001)
    socket_path = tmp_path / "td" / "data" / "public" / "agent.sock"
    assert result.stderr == (
        f"Warning: {blocked} is closed to other users, so workloads that run as another "
        f"user cannot reach the agent's socket {socket_path}; "
        "choose a --dir every workload can traverse, or another socket in agent.toml\n"
    )


# -- next to tessera up ---------------------------------------------------------------------


def test_admin_commands_next_to_tessera_up_find_its_server(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / ".tessera").start()
    try:
        up.wait_for_socket()
        # Run from the directory that holds .tessera, with no --data-dir: as the README says.
        result = subprocess.run([TESSERA, "server", "entry", "count", "--output", "json"],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
    finally:
        assert up.terminate() == 0, up.log()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"count": 1}


# -- selectors --------------------------------------------------------------------------------


def test_a_selector_type_no_attestor_knows_is_kept_with_a_warning(server: ServerProcess) -> None:
    result = server.cli("entry", "create", "--parent-id", "spiffe://example.org/node/a",
                        "--spiffe-id", "spiffe://example.org/web", "--selector", "uid:1",
                        "--output", "json")

    assert json.loads(result.stdout)["selectors"] == [{"type": "uid", "value": "1"}]
    assert result.stderr == (
        "Warning: no workload attestor knows the selector type 'uid' (known: docker, k8s, "
        "systemd, unix); the entry keeps it (SPIRE's rule), but only a workload attestor of "
        "that type could ever match it\n"
    )
    quiet = server.cli("entry", "create", "--parent-id", "spiffe://example.org/node/a",
                       "--spiffe-id", "spiffe://example.org/api", "--selector", "unix:uid:1")
    assert quiet.stderr == ""


# -- make demo ----------------------------------------------------------------------------------


def test_make_demo_runs_the_demo_from_the_make_up_terminal() -> None:
    """`make demo` works where `tessera` is not on PATH (no venv activated)."""
    repository = Path(__file__).resolve().parents[2]
    venv = Path(sys.executable).parent.parent
    stamp = venv / ".installed"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"
    result = subprocess.run(
        ["make", "-s", "-o", str(stamp), f"VENV={venv}", "demo",
         "DEMO_ARGS=--duration 5 --svid-ttl 4 --output json"],
        capture_output=True, text=True, timeout=120, cwd=repository, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["failures"] == 0
    assert report["requests"] >= 1
