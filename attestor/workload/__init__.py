"""Workload attestors: from the caller of the Workload API to its selectors.

The agent learns who called it from the Unix socket itself (``SO_PEERCRED``:
pid, uid and gid, filled in by the kernel, so a caller cannot lie about them).
Each configured attestor turns those credentials into selectors of its own type
(``unix:uid:1000``, ``docker:id:...``, ``k8s:pod-uid:...``,
``systemd:unit:nginx.service``); the workload's selectors are their union::

    attestors = [
        WORKLOAD_ATTESTORS.load(PluginConfig("unix", {"hash_binary": True}), DEFAULT_PROC_ROOT),
        WORKLOAD_ATTESTORS.load(PluginConfig("systemd"), DEFAULT_PROC_ROOT),
    ]
    peer = peer_credentials(connection)
    selectors = attest_with_pid_guard(attestors, peer)

:data:`WORKLOAD_ATTESTORS` is the registry (see :mod:`attestor.plugin`); its
context is the ``/proc`` root the attestors read.

Attestors read ``/proc/<pid>/...``; a pid can be reused by another process once
the caller exits, so :func:`attest_with_pid_guard` checks the process start time
before and after attesting and refuses when it changed.

Attestors do blocking file I/O (``unix`` may hash a binary of many MiB); an
asyncio server should call them in a worker thread.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from attestor.plugin import PluginConfig, Registry
from attestor.selector import Selector
from sdk.errors import TesseraError

__all__ = [
    "DEFAULT_PROC_ROOT",
    "WORKLOAD_ATTESTORS",
    "PeerCredentials",
    "WorkloadAttestationError",
    "WorkloadAttestor",
    "attest_with_pid_guard",
    "attest_workload",
    "check_pid",
    "load_workload_attestor",
    "peer_credentials",
    "process_not_found",
    "process_start_time",
    "read_proc_bytes",
    "read_proc_file",
]

DEFAULT_PROC_ROOT = Path("/proc")

_UCRED = struct.Struct("3i")
# /proc/<pid>/stat: "pid (comm) state ppid ..."; starttime is field 22, which is
# the 20th field after the closing parenthesis of comm (state is field 3).
_STARTTIME_AFTER_COMM = 22 - 3
# One read() takes all of a /proc/<pid>/{stat,status,cgroup} file in all but odd cases.
_PROC_READ_SIZE = 4096
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC


class WorkloadAttestationError(TesseraError):
    """The caller could not be attested; the message is safe to log and return."""

    status = 403


@dataclass(frozen=True)
class PeerCredentials:
    """Who is on the other end of a Unix socket, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int


class WorkloadAttestor(Protocol):
    name: str
    """The selector type it produces, e.g. ``unix``."""

    def attest(self, peer: PeerCredentials) -> list[Selector]:
        """The caller's selectors; raises WorkloadAttestationError when it cannot tell."""
        ...


WORKLOAD_ATTESTORS: Registry[Path, WorkloadAttestor] = Registry(
    "workload attestor",
    "workload_attestors",
    {
        "docker": "attestor.workload.docker",
        "k8s": "attestor.workload.k8s",
        "systemd": "attestor.workload.systemd",
        "unix": "attestor.workload.unix",
    },
)
"""The built-in workload attestors; the context is the ``/proc`` root they read."""


def load_workload_attestor(
    name: str, config: Mapping[str, Any], *, proc_root: Path = DEFAULT_PROC_ROOT
) -> WorkloadAttestor:
    """Build the attestor named in ``[workload_attestors.<name>]`` from its settings."""
    return WORKLOAD_ATTESTORS.load(PluginConfig(name, config), proc_root)


def attest_workload(
    attestors: Sequence[WorkloadAttestor], peer: PeerCredentials
) -> frozenset[Selector]:
    """The union of every attestor's selectors; the first error stops attestation."""
    selectors: set[Selector] = set()
    for attestor in attestors:
        selectors.update(attestor.attest(peer))
    return frozenset(selectors)


def attest_with_pid_guard(
    attestors: Sequence[WorkloadAttestor],
    peer: PeerCredentials,
    proc_root: Path = DEFAULT_PROC_ROOT,
) -> frozenset[Selector]:
    """Attest, refusing if the pid stopped naming the same process meanwhile."""
    started = process_start_time(peer.pid, proc_root)
    selectors = attest_workload(attestors, peer)
    _require_same_process(peer.pid, started, proc_root)
    return selectors


def _require_same_process(pid: int, started: int, proc_root: Path) -> None:
    try:
        still = process_start_time(pid, proc_root)
    except WorkloadAttestationError as err:
        raise _replaced(pid) from err
    if still != started:
        raise _replaced(pid)


def _replaced(pid: int) -> WorkloadAttestationError:
    return WorkloadAttestationError(f"process {pid} exited or was replaced during attestation")


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The pid, uid and gid of the process connected to a Unix socket (SO_PEERCRED).

    The kernel records them when the peer connects (or calls socketpair), so
    they describe the caller even if it changed its credentials since.
    """
    if sock.family != socket.AF_UNIX:
        raise WorkloadAttestationError(
            "the socket is not a Unix domain socket, so it has no peer credentials; "
            "serve the Workload API on a Unix socket"
        )
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as err:
        raise WorkloadAttestationError(
            f"cannot read the caller's credentials from the socket: {err.strerror}"
        ) from err
    pid, uid, gid = _UCRED.unpack(raw)
    if uid < 0 or gid < 0:
        # The kernel reports uid/gid -1 when no peer has connected.
        raise WorkloadAttestationError(
            "the socket has no connected peer, so it has no peer credentials"
        )
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def process_start_time(pid: int, proc_root: Path = DEFAULT_PROC_ROOT) -> int:
    """Field 22 of ``/proc/<pid>/stat``: when the process started, in clock ticks since boot.

    ``comm`` (field 2) is the program name in parentheses and may itself contain
    spaces and parentheses, so the fields are counted from its *last* ``)``.
    """
    raw = read_proc_bytes(pid, "stat", proc_root)
    _, paren, rest = raw.rpartition(b")")
    fields = rest.split()
    if not paren or len(fields) <= _STARTTIME_AFTER_COMM:
        raise WorkloadAttestationError(f"{proc_root}/{pid}/stat is not in the expected format")
    try:
        return int(fields[_STARTTIME_AFTER_COMM])
    except ValueError:
        raise WorkloadAttestationError(
            f"{proc_root}/{pid}/stat is not in the expected format"
        ) from None


def process_not_found(pid: int) -> WorkloadAttestationError:
    return WorkloadAttestationError(
        f"process {pid} does not exist; it may have exited before it could be attested"
    )


def read_proc_file(pid: int, name: str, proc_root: Path = DEFAULT_PROC_ROOT) -> str:
    """Read ``<proc_root>/<pid>/<name>``, translating OS errors into attestation errors."""
    return read_proc_bytes(pid, name, proc_root).decode("utf-8", "surrogateescape")


def read_proc_bytes(pid: int, name: str, proc_root: Path = DEFAULT_PROC_ROOT) -> bytes:
    """:func:`read_proc_file` without decoding.

    With ``os.open``/``os.read`` rather than a Python file object: the files are
    small and read on every Workload API call, where a file object's setup
    costs several times the read itself.
    """
    check_pid(pid)
    path = f"{proc_root}/{pid}/{name}"
    try:
        fd = os.open(path, _OPEN_FLAGS)
        try:
            chunks = []
            while chunk := os.read(fd, _PROC_READ_SIZE):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except (FileNotFoundError, ProcessLookupError):
        raise process_not_found(pid) from None
    except PermissionError:
        raise WorkloadAttestationError(
            f"permission denied reading {path}; run the agent as root or with "
            "CAP_SYS_PTRACE so it can inspect its callers"
        ) from None
    except OSError as err:
        raise WorkloadAttestationError(f"cannot read {path}: {err.strerror}") from err
    return b"".join(chunks)


def check_pid(pid: int) -> None:
    """A pid of 0 means the caller lives in a pid namespace the agent cannot see."""
    if pid <= 0:
        raise WorkloadAttestationError(
            f"the caller's pid is {pid}: it runs in a pid namespace the agent cannot see; "
            "run the agent in the host pid namespace"
        )
