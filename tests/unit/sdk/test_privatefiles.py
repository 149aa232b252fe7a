"""Private directories and whole-file writes (sdk/privatefiles.py), with the failures a
disk can give injected at the write."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from sdk import privatefiles
from sdk.errors import ConfigError
from sdk.privatefiles import (
    make_directories,
    os_error_sentence,
    prepare_private_dir,
    prepare_socket_dir,
    write_file_atomically,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_write_replaces_the_file_whole_with_the_mode_given(tmp_path: Path) -> None:
    path = tmp_path / "server-id"
    path.write_bytes(b"old\n")
    old_umask = os.umask(0o077)
    try:
        write_file_atomically(path, b"new\n", mode=0o640)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new\n"
    assert _mode(path) == 0o640
    assert os.listdir(tmp_path) == ["server-id"]


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_full_disk_leaves_the_old_content_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "server-id"
    path.write_bytes(b"old\n")

    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(privatefiles.os, failing, full)
    with pytest.raises(OSError) as failed:
        write_file_atomically(path, b"new\n")

    assert failed.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old\n"
    assert os.listdir(tmp_path) == ["server-id"]


def test_a_full_disk_on_the_first_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(privatefiles.os, "fsync", full)
    with pytest.raises(OSError):
        write_file_atomically(tmp_path / "server-id", b"3f0c\n", replace=False)
    assert os.listdir(tmp_path) == []


def test_without_replace_an_existing_file_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "server-id"
    path.write_bytes(b"first\n")
    with pytest.raises(FileExistsError):
        write_file_atomically(path, b"second\n", replace=False)
    assert path.read_bytes() == b"first\n"
    assert os.listdir(tmp_path) == ["server-id"]


@pytest.mark.parametrize(("code", "advice"), [
    (errno.ENOSPC, "the disk is full; free some space (or raise the quota) and start again"),
    (errno.EROFS, "the file system is read-only; choose a --data-dir on a writable file system"),
    (errno.EACCES, "this user may not write there; choose a --data-dir it may write to"),
])
def test_os_errors_become_a_sentence_with_what_to_do(code: int, advice: str) -> None:
    err = OSError(code, os.strerror(code))
    assert os_error_sentence(err, "write the server ID file /d/server-id") == (
        f"cannot write the server ID file /d/server-id: {os.strerror(code)}; {advice}"
    )


def test_make_directories_says_which_it_made(tmp_path: Path) -> None:
    made = make_directories(tmp_path / "a" / "b", mode=0o700, parent_mode=0o755)
    assert made == [tmp_path / "a", tmp_path / "a" / "b"]
    assert (_mode(tmp_path / "a"), _mode(tmp_path / "a" / "b")) == (0o755, 0o700)
    assert make_directories(tmp_path / "a" / "b", mode=0o700) == []


def test_the_data_dir_is_made_private_and_an_own_open_one_tightened(tmp_path: Path) -> None:
    prepare_private_dir(tmp_path / "new")
    assert _mode(tmp_path / "new") == 0o700
    own = tmp_path / "own"
    own.mkdir()
    own.chmod(0o755)
    prepare_private_dir(own)
    assert _mode(own) == 0o700


def test_a_shared_data_dir_is_refused_and_left_alone(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ConfigError) as refused:
        prepare_private_dir(shared)
    assert refused.value.message == (
        f"the data directory {shared} may be written by other users (mode 1777); choose a "
        "directory of its own (e.g. a subdirectory the server creates itself); the server "
        "does not change the mode of a shared directory"
    )
    assert _mode(shared) == 0o1777


def test_a_socket_directory_is_made_private(tmp_path: Path) -> None:
    prepare_socket_dir(tmp_path / "run" / "tessera", what="admin socket", flag="--admin-socket")
    assert _mode(tmp_path / "run" / "tessera") == 0o700
    assert _mode(tmp_path / "run") == 0o755


def test_an_existing_socket_directory_is_never_chmod_ed(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    with pytest.raises(ConfigError) as refused:
        prepare_socket_dir(open_dir, what="admin socket", flag="--admin-socket")
    assert refused.value.message == (
        f"the admin socket's directory {open_dir} is open to other users (mode 0755); make it "
        f"private with 'chmod 700 {open_dir}', or point --admin-socket into a directory that "
        "does not exist yet, which the server creates private (0700)"
    )
    assert _mode(open_dir) == 0o755
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    prepare_socket_dir(private, what="admin socket", flag="--admin-socket")
    assert _mode(private) == 0o700


def test_a_socket_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a directory to another user")
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(ConfigError) as refused:
        prepare_socket_dir(foreign, what="admin socket", flag="--admin-socket")
    assert "belongs to another user (uid 65534)" in refused.value.message
