"""``tessera server run`` starting up, the way an operator meets it: a port in use, a
shared or foreign admin socket directory, a damaged server ID, a full or read-only disk,
a config file that is not TOML, two servers with one ID on one database, and the JWT
key type following the CA's."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import TESSERA, ServerProcess, free_port, tessera

pytestmark = pytest.mark.integration

EXIT_DEADLINE = 30.0


def run_server(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``tessera server run ARGS``, expected to exit by itself; a server that keeps
    running instead fails the test (and is stopped)."""
    command = [*prefix, TESSERA, "server", "run", "--trust-domain", "example.org", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        stdout, stderr = process.communicate(timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"the server kept running instead of refusing:\n{stderr}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


# -- the node API's port -------------------------------------------------------------------


def test_a_port_in_use_is_one_sentence_and_nothing_is_made(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = run_server("--data-dir", str(data_dir), "--bind", f"127.0.0.1:{port}")

    assert error_line(result) == (
        f"Error: port 127.0.0.1:{port} is in use; stop the process listening there, or "
        "choose another address with --bind"
    )
    assert len(result.stderr.splitlines()) <= 4, result.stderr  # the start-up lines, the error
    assert not data_dir.exists()  # no CA key, no datastore, no server ID


# -- the admin socket's directory ----------------------------------------------------------


def test_an_admin_socket_in_a_shared_directory_is_refused_and_its_mode_kept(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)

    result = run_server("--data-dir", str(tmp_path / "data"), "--bind",
                        f"127.0.0.1:{free_port()}", "--admin-socket", str(shared / "admin.sock"))

    assert error_line(result) == (
        f"Error: the admin socket's directory {shared} may be written by other users "
        "(mode 1777); point --admin-socket into a directory of its own (e.g. a subdirectory "
        "the server creates itself); the server does not change the mode of a shared directory"
    )
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_an_admin_socket_in_another_users_directory_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)  # the tests run as root: hand it to "nobody"

    result = run_server("--data-dir", str(tmp_path / "data"), "--bind",
                        f"127.0.0.1:{free_port()}", "--admin-socket", str(foreign / "admin.sock"))

    assert error_line(result) == (
        f"Error: the admin socket's directory {foreign} belongs to another user (uid 65534); "
        "point --admin-socket into a directory of its own, owned by the user the server runs "
        "as (the server does not change the mode of a directory it does not own)"
    )
    assert stat.S_IMODE(foreign.stat().st_mode) == 0o700


@dataclass
class ServerWithSocket(ServerProcess):
    socket_path: Path = Path()

    @property
    def admin_socket(self) -> Path:
        return self.socket_path


def test_an_admin_socket_directory_the_server_makes_is_private(tmp_path: Path) -> None:
    socket_path = tmp_path / "run" / "admin.sock"
    server = ServerWithSocket(data_dir=tmp_path / "data", port=free_port(),
                              extra=["--admin-socket", str(socket_path)], socket_path=socket_path)
    server.start()
    try:
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    finally:
        server.stop()


# -- the server ID file --------------------------------------------------------------------


@pytest.mark.parametrize(("content", "sentence"), [
    (b"", "is empty, so this server's ID is lost (a start on a full disk could leave it so); "
          "restore the file from a backup, or delete it to have the server make a new ID (the "
          "old ID's authorities leave the bundle when they expire)"),
    (b"\n", "is empty, so this server's ID is lost (a start on a full disk could leave it so); "
            "restore the file from a backup, or delete it to have the server make a new ID "
            "(the old ID's authorities leave the bundle when they expire)"),
    (b"3f0c\x00\xff\n", "does not hold a server ID (32 lower-case hex digits, as the server "
                        "writes it); restore the file from a backup, or delete it to have the "
                        "server make a new ID"),
])
def test_an_empty_or_malformed_server_id_is_refused(
    tmp_path: Path, content: bytes, sentence: str
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / "server-id").write_bytes(content)

    result = run_server("--data-dir", str(data_dir), "--bind", f"127.0.0.1:{free_port()}")

    assert error_line(result) == f"Error: the server ID file {data_dir / 'server-id'} {sentence}"
    assert (data_dir / "server-id").read_bytes() == content
    assert not (data_dir / "datastore.sqlite3").exists()


def test_the_server_id_file_is_written_private_and_whole(server: ServerProcess) -> None:
    path = server.data_dir / "server-id"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    server_id = path.read_text().strip()
    assert len(server_id) == 32 and int(server_id, 16) >= 0
    assert server.cli_json("healthcheck")["server_id"] == server_id
    assert not [p for p in server.data_dir.iterdir() if p.name.endswith(".tmp")]


# -- full and read-only disks, in a private mount namespace ----------------------------------


def _in_private_mounts(tmp_path: Path) -> tuple[str, ...]:
    """A command prefix running the rest in a private mount namespace (root can mount
    there without touching the host's mounts); skips where that is not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) to mount a small file system privately")
    probe = subprocess.run([unshare, "--mount", "--propagation", "private", "mount", "-t",
                            "tmpfs", "-o", "size=16k", "tmpfs", str(tmp_path)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a private namespace here: {probe.stderr.strip()}")
    return (unshare, "--mount", "--propagation", "private")


def test_a_full_disk_is_a_sentence_and_leaves_no_empty_server_id(tmp_path: Path) -> None:
    prefix = _in_private_mounts(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    data_dir = disk / "data"
    script = (
        f"mount -t tmpfs -o size=16k tmpfs {disk} && "
        f"(dd if=/dev/zero of={disk}/filler bs=4k 2>/dev/null; true) && "
        f'"$@"; status=$?; ls -A {data_dir} >&2; exit $status'
    )
    result = run_server("--data-dir", str(data_dir), "--bind", f"127.0.0.1:{free_port()}",
                        prefix=(*prefix, "sh", "-c", script, "sh"))

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[-1] == (
        f"Error: cannot write the server ID file {data_dir / 'server-id'}: No space left on "
        "device; the disk is full; free some space (or raise the quota) and start again"
    ), result.stderr
    assert not any("server-id" in line for line in lines[:-1] if not line.startswith("Error")), (
        "a server-id file (or its temporary) was left in the data dir:\n" + result.stderr
    )


def test_a_read_only_data_dir_is_a_sentence(tmp_path: Path) -> None:
    prefix = _in_private_mounts(tmp_path)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    data_dir = read_only / "data"
    script = f'mount --bind -o ro {read_only} {read_only} && exec "$@"'
    result = run_server("--data-dir", str(data_dir), "--bind", f"127.0.0.1:{free_port()}",
                        prefix=(*prefix, "sh", "-c", script, "sh"))

    assert error_line(result) == (
        f"Error: cannot prepare the data directory {data_dir}: Read-only file system; the file "
        "system is read-only; choose a --data-dir on a writable file system"
    )


# -- the config file -----------------------------------------------------------------------


def test_a_config_file_that_is_not_utf8_is_one_sentence(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_bytes(b'trust_domain = "example.org"\nbind = "caf\xe9:8081"\n')

    result = tessera("server", "run", "--config", str(config), check=False)

    assert result.returncode == 1
    assert result.stderr == (
        f"Error: config file {config} is not UTF-8 text (line 2 has the byte 0xe9); TOML "
        "files must be UTF-8, so save it as UTF-8\n"
    )


def test_a_config_file_that_is_not_toml_names_the_line(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('trust_domain = "example.org"\nca_ttl = 12h\n')

    result = tessera("server", "run", "--config", str(config), check=False)

    assert result.returncode == 1
    assert result.stderr == (
        f"Error: config file {config} is not valid TOML: Expected newline or end of document "
        "after a statement (at line 2, column 12); correct that line\n"
    )


# -- two servers, one server ID, one database ----------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_second_server_with_the_same_id_refuses_until_the_first_is_gone(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "postgres":
        db = str(request.getfixturevalue("postgres_url"))
    else:
        db = f"sqlite:///{tmp_path}/shared.sqlite3"
    config = tmp_path / "server.toml"
    # A lease far longer than the test: the second server may only take over because the
    # first's pid is gone, never because a slow start let the lease run out.
    config.write_text('server_lease_ttl = "5m"\n')
    first = ServerProcess(data_dir=tmp_path / "first", port=free_port(), db=db,
                          extra=["--config", str(config)])
    second = ServerProcess(data_dir=tmp_path / "second", port=free_port(), db=db,
                           extra=["--config", str(config)])
    try:
        first.start()
        server_id = (first.data_dir / "server-id").read_text().strip()
        second.data_dir.mkdir(mode=0o700)
        shutil.copy(first.data_dir / "server-id", second.data_dir / "server-id")  # a copied dir

        refused = run_server("--data-dir", str(second.data_dir), "--bind", second.address,
                             "--db", db, "--config", str(config))

        assert first.process is not None
        line = error_line(refused)
        assert line.startswith(
            f"Error: server ID {server_id} is in use by a running server (pid "
            f"{first.process.pid} on {socket.gethostname()}, started "
        ), refused.stderr
        assert line.endswith(
            "on the same datastore; two servers with one ID would take each other's "
            "authorities. Stop that server, or give this one a data directory of its own (an "
            "empty --data-dir makes a new server ID; never copy a data directory)"
        ), refused.stderr
        assert first.healthy()

        first_pid = first.process.pid
        first.process.send_signal(signal.SIGKILL)  # a crash: the lease is left behind
        first.process.wait()
        first.process = None

        # The dead server ran in this pid namespace: its lease is taken over at once.
        second.start()
        assert second.cli_json("healthcheck")["server_id"] == server_id
        assert (f"took over server ID {server_id}: its previous holder (pid {first_pid}) is "
                "no longer running") in second.log()
    finally:
        first.stop()
        second.stop()


def test_a_server_stopped_cleanly_starts_again_at_once(start_server: object,
                                                       tmp_path: Path) -> None:
    server: ServerProcess = start_server()  # type: ignore[operator]
    server.stop()
    server.start()
    assert "waiting up to" not in server.log()


def test_bind_port_0_shows_the_port_the_node_api_got(tmp_path: Path) -> None:
    server = ServerProcess(data_dir=tmp_path / "server", port=0).start()
    try:
        assert server.process is not None
        server.process.wait_for("Server is ready")
        [line] = [line for line in server.log().splitlines() if "node API:" in line]
        port = int(line.rsplit(":", 1)[1])
        assert port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the port shown is the one listening
        assert server.cli_json("healthcheck")["node_api"] == f"127.0.0.1:{port}"
    finally:
        server.stop()


# -- the JWT authority's key type ------------------------------------------------------------


@pytest.mark.parametrize(("ca_key_type", "alg", "extra"), [
    ("rsa-2048", "RS256", ()),
    ("ec-p384", "ES384", ()),
    ("rsa-2048", "ES256", ('jwt_key_type = "ec-p256"\n',)),
])
def test_the_jwt_key_type_follows_the_ca_key_type_unless_set(
    start_server: object, tmp_path: Path, ca_key_type: str, alg: str, extra: tuple[str, ...]
) -> None:
    args = ["--ca-key-type", ca_key_type]
    if extra:
        config = tmp_path / "server.toml"
        config.write_text("".join(extra))
        args += ["--config", str(config)]
    server: ServerProcess = start_server(extra=args)  # type: ignore[operator]

    minted = server.cli_json("jwt", "mint", "--spiffe-id", "spiffe://example.org/web",
                             "--audience", "db")
    token = str(minted["token"])
    header = json.loads(base64.urlsafe_b64decode(token.split(".", maxsplit=1)[0] + "=="))
    assert header["alg"] == alg
