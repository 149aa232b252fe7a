"""The server's start-up: its ID file and the lease on its ID (ca/server.py,
ca/serverlease.py), with a manual clock and no sleeping."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from ca.datastore.store import Datastore
from ca.server import load_server_id
from ca.serverlease import LeaseLost, ServerIdInUse, ServerIdLease, pid_namespace
from sdk import privatefiles
from sdk.clock import ManualClock
from sdk.errors import ConfigError
from tests.unit.ca.conftest import START

TTL = timedelta(seconds=5)
SERVER_ID = "3f0c1e2d3c4b5a69788796a5b4c3d2e1"


# -- the server ID file ----------------------------------------------------------------------


def test_a_new_data_dir_gets_an_id_written_private(tmp_path: Path) -> None:
    server_id = load_server_id(tmp_path)
    assert len(server_id) == 32 and int(server_id, 16) >= 0
    assert (tmp_path / "server-id").read_text() == server_id + "\n"
    assert os.stat(tmp_path / "server-id").st_mode & 0o777 == 0o600
    assert load_server_id(tmp_path) == server_id


def test_an_empty_id_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "server-id").write_text("  \n")
    with pytest.raises(ConfigError) as refused:
        load_server_id(tmp_path)
    assert refused.value.message == (
        f"the server ID file {tmp_path / 'server-id'} is empty, so this server's ID is lost "
        "(a start on a full disk could leave it so); restore the file from a backup, or "
        "delete it to have the server make a new ID (the old ID's authorities leave the "
        "bundle when they expire)"
    )


@pytest.mark.parametrize("content", [b"3f0c", b"3F0C1E2D3C4B5A69788796A5B4C3D2E1", b"a b",
                                     b"\xff" * 32, b"../../etc/passwd"])
def test_a_malformed_id_file_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "server-id").write_bytes(content)
    with pytest.raises(ConfigError) as refused:
        load_server_id(tmp_path)
    assert refused.value.message == (
        f"the server ID file {tmp_path / 'server-id'} does not hold a server ID (32 "
        "lower-case hex digits, as the server writes it); restore the file from a backup, "
        "or delete it to have the server make a new ID"
    )


def test_a_full_disk_leaves_no_id_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(privatefiles.os, "write", full)
    with pytest.raises(ConfigError) as refused:
        load_server_id(tmp_path)
    assert refused.value.message == (
        f"cannot write the server ID file {tmp_path / 'server-id'}: No space left on device; "
        "the disk is full; free some space (or raise the quota) and start again"
    )
    assert os.listdir(tmp_path) == []


def test_a_read_only_data_dir_is_a_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            ) -> None:
    real_open = os.open

    def read_only(path: object, flags: int, *args: object) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(privatefiles.os, "open", read_only)
    with pytest.raises(ConfigError) as refused:
        load_server_id(tmp_path)
    assert refused.value.message.startswith(
        f"cannot write the server ID file {tmp_path / 'server-id'} ("
    )
    assert refused.value.message.endswith(
        ": Read-only file system; the file system is read-only; choose a --data-dir on a "
        "writable file system"
    )


# -- the lease on the server ID ----------------------------------------------------------------


class Sleeper:
    """Stands in for time.sleep: moves the manual clock, and lets a test act meanwhile."""

    def __init__(self, clock: ManualClock, meanwhile: object = None) -> None:
        self.clock = clock
        self.meanwhile = meanwhile
        self.calls = 0

    def __call__(self, seconds: float) -> None:
        self.calls += 1
        self.clock.advance(timedelta(seconds=seconds))
        if callable(self.meanwhile):
            self.meanwhile()


@pytest.fixture
def store(datastore_url: str) -> Datastore:
    clock = ManualClock(START)
    opened = Datastore.open(datastore_url, clock=clock)
    opened.test_clock = clock  # type: ignore[attr-defined]
    yield opened  # type: ignore[misc]
    opened.close()


def test_a_free_id_is_taken_at_once(store: Datastore) -> None:
    clock: ManualClock = store.test_clock  # type: ignore[attr-defined]
    sleeper = Sleeper(clock)
    ServerIdLease.claim(store, SERVER_ID, ttl=TTL, clock=clock, sleep=sleeper)
    assert sleeper.calls == 0


def test_a_running_holder_makes_the_newcomer_refuse(store: Datastore) -> None:
    clock: ManualClock = store.test_clock  # type: ignore[attr-defined]
    holder = ServerIdLease.claim(store, SERVER_ID, ttl=TTL, clock=clock)
    sleeper = Sleeper(clock, meanwhile=holder.renew)  # the holder's tick goes on

    with pytest.raises(ServerIdInUse) as refused:
        ServerIdLease.claim(store, SERVER_ID, ttl=TTL, clock=clock, sleep=sleeper)

    assert refused.value.message == (
        f"server ID {SERVER_ID} is in use by a running server (pid {os.getpid()} on "
        f"{socket.gethostname()}, started 2030-01-01 00:00:00 UTC) on the same datastore; "
        "two servers with one ID would take each other's authorities. Stop that server, or "
        "give this one a data directory of its own (an empty --data-dir makes a new server "
        "ID; never copy a data directory)"
    )
    assert sleeper.calls == 1


def test_a_dead_holders_lease_is_taken_over_within_one_ttl(store: Datastore) -> None:
    clock: ManualClock = store.test_clock  # type: ignore[attr-defined]
    dead = ServerIdLease.claim(store, SERVER_ID, ttl=TTL, clock=clock)
    clock.advance(timedelta(seconds=2))
    sleeper = Sleeper(clock)  # nobody renews: the holder was killed

    taken = ServerIdLease.claim(store, SERVER_ID, ttl=TTL, clock=clock, sleep=sleeper)

    assert sleeper.calls * 0.2 <= TTL.total_seconds()  # bounded by the lease left
    taken.renew()
    with pytest.raises(LeaseLost) as lost:  # were the old holder alive after all
        dead.renew()
    assert lost.value.message.startswith(
        f"another server (pid {os.getpid()} on {socket.gethostname()}) took over server ID "
        f"{SERVER_ID} while this one could not renew its lease (for longer than 5s)"
    )


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) just now."""
    probe = subprocess.Popen(["true"])
    probe.wait()
    return probe.pid


def _left_by(store: Datastore, pid: int, namespace: str) -> None:
    """A lease as a process ``pid`` in ``namespace`` left it when it was killed."""
    store.claim_server_lease(SERVER_ID, "0" * 32, ttl=TTL, hostname=socket.gethostname(),
                             pid=pid, pid_namespace=namespace)


def test_a_lease_whose_holder_is_gone_from_this_pid_namespace_is_taken_at_once(
    store: Datastore, caplog: pytest.LogCaptureFixture
) -> None:
    clock: ManualClock = store.test_clock  # type: ignore[attr-defined]
    pid = _dead_pid()
    _left_by(store, pid, pid_namespace())
    sleeper = Sleeper(clock)

    with caplog.at_level("INFO", logger="ca.serverlease"):
        lease = ServerIdLease.claim(store, SERVER_ID, ttl=TTL, clock=clock, sleep=sleeper)

    assert sleeper.calls == 0
    lease.renew()
    assert (f"took over server ID {SERVER_ID}: its previous holder (pid {pid}) is no longer "
            "running") in caplog.text


def test_a_dead_pid_from_another_pid_namespace_is_waited_out(store: Datastore) -> None:
    clock: ManualClock = store.test_clock  # type: ignore[attr-defined]
    _left_by(store, _dead_pid(), "another-boot/4026531836")  # another host or container
    sleeper = Sleeper(clock)

    ServerIdLease.claim(store, SERVER_ID, ttl=TTL, clock=clock, sleep=sleeper)

    assert sleeper.calls * 0.2 >= TTL.total_seconds()  # only once the lease had lapsed


def test_a_released_lease_is_free_at_once(store: Datastore) -> None:
    clock: ManualClock = store.test_clock  # type: ignore[attr-defined]
    ServerIdLease.claim(store, SERVER_ID, ttl=TTL, clock=clock).release()
    sleeper = Sleeper(clock)
    ServerIdLease.claim(store, SERVER_ID, ttl=TTL, clock=clock, sleep=sleeper)
    assert sleeper.calls == 0


def test_a_lease_survives_an_outage_nobody_used(store: Datastore) -> None:
    clock: ManualClock = store.test_clock  # type: ignore[attr-defined]
    lease = ServerIdLease.claim(store, SERVER_ID, ttl=TTL, clock=clock)
    clock.advance(TTL * 3)  # no renewal for a while: the datastore was away
    lease.renew()  # nobody took the ID meanwhile: still ours
