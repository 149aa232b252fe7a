"""The files and directories a server keeps to itself: made private, written whole.

- :func:`write_file_atomically` writes through a temporary file in the same
  directory (fsynced, its mode set before it gets its name) renamed into place,
  so a crash or a full disk leaves the old content or the new, never an empty
  or half-written file::

      write_file_atomically(data_dir / "server-id", b"3f0c...\\n", mode=0o600)

- :func:`prepare_private_dir` gives the server its data directory: made 0700
  when missing, tightened to 0700 when this user owns it, refused when another
  user owns it or others may write to it.
- :func:`prepare_socket_dir` checks the directory of a Unix socket the server
  serves on: made 0700 when the server makes it, refused when another user owns
  it or others may write into it (``/tmp``), and never chmod-ed otherwise, so a
  socket pointed into a shared directory cannot change that directory's mode.
- :func:`make_directories` is ``mkdir -p`` that says which directories it made,
  so only those get a mode of the caller's choosing (the agent's socket
  directory does the same with a traversable mode).
- :func:`os_error_sentence` turns an ``OSError`` from any of these (a
  read-only file system, a full disk, a permission) into what to do about it.

Tessera-internal: used by the server, the agent and the sidecar, not part of the SDK's
public API (it is not in ``sdk.__all__``) and may change without notice.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

from sdk.errors import ConfigError

__all__ = [
    "CREATED_PARENT_MODE",
    "PRIVATE_DIR_MODE",
    "make_directories",
    "os_error_sentence",
    "prepare_private_dir",
    "prepare_socket_dir",
    "write_file_atomically",
]

PRIVATE_DIR_MODE = 0o700
CREATED_PARENT_MODE = 0o755


def write_file_atomically(
    path: Path, content: bytes, *, mode: int = 0o600, replace: bool = True
) -> None:
    """Write ``content`` to ``path`` whole, or not at all.

    With ``replace=False`` an existing ``path`` is kept and FileExistsError raised,
    so two processes creating the same file agree on one content. OSError (a full
    disk, a read-only file system) leaves no temporary file behind.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(temporary, mode)  # the umask may have taken bits off
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # FileExistsError when another process won
        _fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(directory: Path, *, mode: int, parent_mode: int | None = None) -> list[Path]:
    """``mkdir -p directory``; each directory made gets ``mode`` (its missing parents
    ``parent_mode``, by default ``mode`` too), whatever the umask. Returns the
    directories it made, outermost first; directories that existed are not touched."""
    missing: list[Path] = []
    walk = directory
    while not walk.exists():
        missing.append(walk)
        if walk.parent == walk:
            break
        walk = walk.parent
    created: list[Path] = []
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to chmod
        created.append(path)
        os.chmod(path, mode if path == directory else (parent_mode or mode))
    return created


def prepare_private_dir(path: Path, *, what: str = "data directory") -> None:
    """Make the server's own directory, or check and tighten an existing one to 0700.

    ConfigError when another user owns it or others may write to it (such a
    directory is shared, and its mode is not the server's to change), or when it
    cannot be made.
    """
    try:
        if make_directories(path, mode=PRIVATE_DIR_MODE, parent_mode=CREATED_PARENT_MODE):
            return
        info = path.stat()
        _refuse_shared(path, info, what)
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(path, PRIVATE_DIR_MODE)
    except OSError as err:
        raise ConfigError(os_error_sentence(err, f"prepare the {what} {path}")) from err


def prepare_socket_dir(path: Path, *, what: str, flag: str) -> None:
    """Make the directory a private socket lives in (0700), or check an existing one.

    An existing directory is never chmod-ed: it must belong to this user and be
    closed to others (0700), else ConfigError says which and what to do.
    """
    try:
        if make_directories(path, mode=PRIVATE_DIR_MODE, parent_mode=CREATED_PARENT_MODE):
            return
        info = path.stat()
        _refuse_shared(path, info, f"{what}'s directory", flag=flag)
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"the {what}'s directory {path} is open to other users (mode {mode:04o}); "
                f"make it private with 'chmod 700 {path}', or point {flag} into a "
                "directory that does not exist yet, which the server creates private (0700)"
            )
    except OSError as err:
        raise ConfigError(os_error_sentence(err, f"prepare the {what}'s directory {path}")) from err


def _refuse_shared(path: Path, info: os.stat_result, what: str, *, flag: str = "") -> None:
    elsewhere = (
        f"point {flag} into a directory of its own" if flag
        else "choose a directory of its own"
    )
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"the {what} {path} is not a directory; {elsewhere}")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"the {what} {path} belongs to another user (uid {info.st_uid}); {elsewhere}, "
            "owned by the user the server runs as (the server does not change the mode of "
            "a directory it does not own)"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        raise ConfigError(
            f"the {what} {path} may be written by other users (mode {mode:04o}); {elsewhere} "
            "(e.g. a subdirectory the server creates itself); the server does not change "
            "the mode of a shared directory"
        )


def os_error_sentence(err: OSError, doing: str, *, flag: str = "--data-dir") -> str:
    """What went wrong while ``doing`` (e.g. "write the server ID file X"), and what to do
    (``flag`` names the option that chooses the directory)."""
    reason = err.strerror or str(err)
    match err.errno:
        case errno.ENOSPC | errno.EDQUOT:
            advice = "the disk is full; free some space (or raise the quota) and start again"
        case errno.EROFS:
            advice = (
                f"the file system is read-only; choose a {flag} on a writable file system"
            )
        case errno.EACCES | errno.EPERM:
            advice = (
                f"this user may not write there; choose a {flag} it may write to"
            )
        case _:
            advice = "check the path, its file system and its permissions"
    where = f" ({err.filename})" if err.filename and str(err.filename) not in doing else ""
    return f"cannot {doing}{where}: {reason}; {advice}"
