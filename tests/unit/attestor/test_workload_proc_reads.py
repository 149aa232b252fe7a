"""Reading ``/proc`` for the workload attestors, and the ``unix`` digest cache key."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from attestor.selector import Selector
from attestor.workload import (
    PeerCredentials,
    WorkloadAttestationError,
    read_proc_bytes,
    read_proc_file,
)
from attestor.workload.unix import UnixWorkloadAttestor

PID = 4242
PEER = PeerCredentials(pid=PID, uid=0, gid=0)


def stat_line(start_time: int) -> str:
    """A /proc/<pid>/stat line; starttime is field 22."""
    fields = ["S", "1", str(PID), str(PID), "0", "-1", "4194560"] + ["0"] * 12
    return f"{PID} (app) " + " ".join([*fields, str(start_time), "12345678", "300"]) + "\n"


def fake_process(proc_root: Path, binary: Path, *, groups: str = "27 4") -> Path:
    directory = proc_root / str(PID)
    directory.mkdir(parents=True)
    (directory / "stat").write_text(stat_line(1000))
    (directory / "status").write_text(f"Name:\tapp\nUid:\t0\t0\t0\t0\nGroups:\t{groups} \n")
    (directory / "exe").symlink_to(binary)
    return directory


def sha256_selector(content: bytes) -> Selector:
    return Selector("unix", f"sha256:{hashlib.sha256(content).hexdigest()}")


# -- the unix attestor's digest cache key -------------------------------------------------


def test_unix_sees_a_changed_binary(tmp_path: Path) -> None:
    binary = tmp_path / "app"
    binary.write_bytes(b"version one")
    fake_process(tmp_path / "proc", binary)
    attestor = UnixWorkloadAttestor(proc_root=tmp_path / "proc")
    assert sha256_selector(b"version one") in attestor.attest(PEER)

    # Same size and mtime, different content: the ctime still tells them apart.
    stat = binary.stat()
    # Rewrite until the ctime moved: kernels with coarse timestamps may need a tick.
    while binary.stat().st_ctime_ns == stat.st_ctime_ns:
        binary.write_bytes(b"version two")
        os.utime(binary, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    selectors = attestor.attest(PEER)

    assert sha256_selector(b"version two") in selectors
    assert sha256_selector(b"version one") not in selectors


def test_unix_sees_an_exec_of_another_binary(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"first binary")
    second.write_bytes(b"second binary")
    exe = fake_process(tmp_path / "proc", first) / "exe"
    attestor = UnixWorkloadAttestor(proc_root=tmp_path / "proc")
    attestor.attest(PEER)
    exe.unlink()
    exe.symlink_to(second)
    after_exec = attestor.attest(PEER)

    # The same pid and start time, now running the first binary again.
    exe.unlink()
    exe.symlink_to(first)
    selectors = attestor.attest(PEER)

    assert sha256_selector(b"second binary") in after_exec
    assert sha256_selector(b"first binary") not in after_exec
    assert sha256_selector(b"first binary") in selectors
    assert Selector("unix", f"path:{first}") in selectors
    assert sha256_selector(b"second binary") not in selectors


# -- reading /proc ------------------------------------------------------------------------


def test_read_proc_bytes_reads_past_its_buffer(tmp_path: Path) -> None:
    groups = " ".join(str(gid) for gid in range(1000, 3000))
    binary = tmp_path / "app"
    binary.write_bytes(b"app")
    fake_process(tmp_path / "proc", binary, groups=groups)
    attestor = UnixWorkloadAttestor(proc_root=tmp_path / "proc", hash_binary=False)

    status = read_proc_bytes(PID, "status", tmp_path / "proc")
    selectors = attestor.attest(PEER)

    assert len(status) > 4096
    assert status == (tmp_path / "proc" / str(PID) / "status").read_bytes()
    gids = [s.value for s in selectors if s.value.startswith("supplementary_gid:")]
    assert gids == [f"supplementary_gid:{gid}" for gid in range(1000, 3000)]


def test_read_proc_file_keeps_undecodable_bytes(tmp_path: Path) -> None:
    (tmp_path / str(PID)).mkdir()
    (tmp_path / str(PID) / "cgroup").write_bytes(b"0::/odd-\xff.scope\n")

    text = read_proc_file(PID, "cgroup", tmp_path)

    assert text == "0::/odd-\udcff.scope\n"


def test_read_proc_file_of_a_missing_process(tmp_path: Path) -> None:
    with pytest.raises(WorkloadAttestationError) as excinfo:
        read_proc_bytes(PID, "status", tmp_path)

    assert excinfo.value.message == (
        f"process {PID} does not exist; it may have exited before it could be attested"
    )


def test_status_without_groups_is_refused(tmp_path: Path) -> None:
    binary = tmp_path / "app"
    binary.write_bytes(b"app")
    directory = fake_process(tmp_path / "proc", binary)
    (directory / "status").write_text("Name:\tapp\nUid:\t0\t0\t0\t0\n")
    attestor = UnixWorkloadAttestor(proc_root=tmp_path / "proc")

    with pytest.raises(WorkloadAttestationError) as excinfo:
        attestor.attest(PEER)

    assert excinfo.value.message == (
        f"{tmp_path / 'proc'}/{PID}/status has no readable Groups line"
    )
