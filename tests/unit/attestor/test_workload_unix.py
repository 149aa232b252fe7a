"""The unix workload attestor against real processes: this one and a child."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import attestor.workload.unix as unix_module
from attestor.selector import Selector
from attestor.workload import PeerCredentials, WorkloadAttestationError, peer_credentials
from attestor.workload.unix import UnixWorkloadAttestor

SLEEP = Path(os.path.realpath("/bin/sleep"))
IS_ROOT = os.geteuid() == 0
# Groups the child is started with when the test may set them (as root).
CHILD_EXTRA_GROUPS = [4, 24]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def values(selectors: list[Selector], kind: str) -> list[str]:
    """The values of the unix selectors of one kind, e.g. kind="uid"."""
    prefix = f"{kind}:"
    return [s.value[len(prefix) :] for s in selectors if s.value.startswith(prefix)]


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def identity_selectors(uid: int, gid: int, groups: list[int]) -> set[Selector]:
    expected = {Selector("unix", f"uid:{uid}"), Selector("unix", f"gid:{gid}")}
    if (user := user_name(uid)) is not None:
        expected.add(Selector("unix", f"user:{user}"))
    if (group := group_name(gid)) is not None:
        expected.add(Selector("unix", f"group:{group}"))
    for extra in groups:
        expected.add(Selector("unix", f"supplementary_gid:{extra}"))
        if (name := group_name(extra)) is not None:
            expected.add(Selector("unix", f"supplementary_group:{name}"))
    return expected


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real workload to attest: /bin/sleep, killed when the test ends."""
    extra: dict[str, Any] = {"extra_groups": CHILD_EXTRA_GROUPS} if IS_ROOT else {}
    child = subprocess.Popen([str(SLEEP), "30"], **extra)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def child_groups() -> list[int]:
    return sorted(CHILD_EXTRA_GROUPS) if IS_ROOT else sorted(set(os.getgroups()))


def me() -> PeerCredentials:
    return PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


def test_current_process_gets_every_selector() -> None:
    selectors = UnixWorkloadAttestor().attest(me())

    binary = Path(os.readlink("/proc/self/exe"))
    expected = identity_selectors(os.getuid(), os.getgid(), sorted(set(os.getgroups())))
    expected |= {
        Selector("unix", f"path:{binary}"),
        Selector("unix", f"sha256:{sha256_of(binary)}"),
    }
    assert set(selectors) == expected
    assert len(selectors) == len(expected)


def test_child_process_gets_its_binary_and_groups(sleeper: subprocess.Popen[bytes]) -> None:
    peer = PeerCredentials(pid=sleeper.pid, uid=os.getuid(), gid=os.getgid())

    selectors = UnixWorkloadAttestor().attest(peer)

    assert values(selectors, "uid") == [str(os.getuid())]
    assert values(selectors, "gid") == [str(os.getgid())]
    assert values(selectors, "user") == [user_name(os.getuid())]
    assert values(selectors, "path") == ["/usr/bin/sleep"] == [str(SLEEP)]
    assert values(selectors, "sha256") == [sha256_of(SLEEP)]
    assert values(selectors, "supplementary_gid") == [str(g) for g in child_groups()]
    expected = identity_selectors(os.getuid(), os.getgid(), child_groups()) | {
        Selector("unix", f"path:{SLEEP}"),
        Selector("unix", f"sha256:{sha256_of(SLEEP)}"),
    }
    assert set(selectors) == expected


def test_uid_and_gid_come_from_the_peer_credentials_not_proc(
    sleeper: subprocess.Popen[bytes],
) -> None:
    peer = PeerCredentials(pid=sleeper.pid, uid=54321, gid=54322)

    selectors = UnixWorkloadAttestor(discover_workload_path=False).attest(peer)

    assert values(selectors, "uid") == ["54321"]
    assert values(selectors, "gid") == ["54322"]


def test_hash_binary_false_drops_sha256(sleeper: subprocess.Popen[bytes]) -> None:
    peer = PeerCredentials(pid=sleeper.pid, uid=os.getuid(), gid=os.getgid())

    selectors = UnixWorkloadAttestor(hash_binary=False).attest(peer)

    assert values(selectors, "path") == [str(SLEEP)]
    assert values(selectors, "sha256") == []


def test_discover_workload_path_false_drops_path_and_sha256(
    sleeper: subprocess.Popen[bytes],
) -> None:
    peer = PeerCredentials(pid=sleeper.pid, uid=os.getuid(), gid=os.getgid())

    selectors = UnixWorkloadAttestor(discover_workload_path=False).attest(peer)

    assert values(selectors, "path") == []
    assert values(selectors, "sha256") == []
    assert values(selectors, "uid") == [str(os.getuid())]


def test_deleted_binary_keeps_its_path_without_sha256(tmp_path: Path) -> None:
    copy = tmp_path / "sleep-copy"
    shutil.copy2(SLEEP, copy)
    child = subprocess.Popen([str(copy), "30"])
    try:
        copy.unlink()
        peer = PeerCredentials(pid=child.pid, uid=os.getuid(), gid=os.getgid())

        selectors = UnixWorkloadAttestor().attest(peer)
    finally:
        child.kill()
        child.wait()

    assert values(selectors, "path") == [str(copy)]
    assert values(selectors, "sha256") == []


def test_pid_that_does_not_exist_is_refused() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    missing = pid_max + 1

    with pytest.raises(WorkloadAttestationError) as excinfo:
        UnixWorkloadAttestor().attest(PeerCredentials(pid=missing, uid=0, gid=0))

    assert excinfo.value.message == (
        f"process {missing} does not exist; it may have exited before it could be attested"
    )


def test_pid_zero_means_another_pid_namespace() -> None:
    with pytest.raises(WorkloadAttestationError) as excinfo:
        UnixWorkloadAttestor().attest(PeerCredentials(pid=0, uid=1000, gid=1000))

    assert excinfo.value.message == (
        "the caller's pid is 0: it runs in a pid namespace the agent cannot see; "
        "run the agent in the host pid namespace"
    )


# -- hashing, against a proc tree the test builds -----------------------------------------


def fake_process(proc_root: Path, pid: int, binary: Path) -> None:
    directory = proc_root / str(pid)
    directory.mkdir(parents=True)
    (directory / "status").write_text("Name:\tapp\nUid:\t0\t0\t0\t0\nGroups:\t27 4 \n")
    (directory / "exe").symlink_to(binary)


class CountingSha256:
    def __init__(self) -> None:
        self.calls = 0
        self._real = hashlib.sha256

    def __call__(self) -> Any:
        self.calls += 1
        return self._real()


def test_sha256_is_cached_until_the_binary_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "app"
    binary.write_bytes(b"version one")
    fake_process(tmp_path / "proc", 77, binary)
    counter = CountingSha256()
    monkeypatch.setattr(unix_module, "hashlib", SimpleNamespace(sha256=counter))
    attestor = UnixWorkloadAttestor(proc_root=tmp_path / "proc")
    peer = PeerCredentials(pid=77, uid=0, gid=0)

    first = attestor.attest(peer)
    second = attestor.attest(peer)

    assert counter.calls == 1
    assert values(first, "sha256") == values(second, "sha256") == [sha256_of(binary)]
    assert values(first, "supplementary_gid") == ["4", "27"]

    # Same size and mtime, different content: the ctime still tells them apart.
    stat = binary.stat()
    binary.write_bytes(b"version two")
    os.utime(binary, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    third = attestor.attest(peer)

    assert counter.calls == 2
    assert values(third, "sha256") == [hashlib.sha256(b"version two").hexdigest()]


def test_binary_larger_than_max_binary_size_is_not_hashed(tmp_path: Path) -> None:
    binary = tmp_path / "app"
    binary.write_bytes(b"x" * 100)
    fake_process(tmp_path / "proc", 77, binary)
    peer = PeerCredentials(pid=77, uid=0, gid=0)

    too_big = UnixWorkloadAttestor(proc_root=tmp_path / "proc", max_binary_size=99).attest(peer)
    fits = UnixWorkloadAttestor(proc_root=tmp_path / "proc", max_binary_size=100).attest(peer)

    assert values(too_big, "path") == [str(binary)]
    assert values(too_big, "sha256") == []
    assert values(fits, "sha256") == [sha256_of(binary)]


# -- peer credentials ---------------------------------------------------------------------


def test_peer_credentials_over_a_real_socketpair() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_credentials(left) == me()
        assert peer_credentials(right) == me()


def test_peer_credentials_of_a_connected_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            connection, _ = server.accept()
            with connection:
                assert peer_credentials(connection) == me()


def test_peer_credentials_need_a_unix_socket() -> None:
    with socket.socket(socket.AF_INET) as tcp, pytest.raises(WorkloadAttestationError) as excinfo:
        peer_credentials(tcp)

    assert excinfo.value.message == (
        "the socket is not a Unix domain socket, so it has no peer credentials; "
        "serve the Workload API on a Unix socket"
    )


def test_peer_credentials_need_a_connected_peer() -> None:
    with socket.socket(socket.AF_UNIX) as lonely, pytest.raises(WorkloadAttestationError) as err:
        peer_credentials(lonely)

    assert err.value.message == "the socket has no connected peer, so it has no peer credentials"
