"""The ``unix`` workload attestor: who runs the caller, and which binary.

    attestor = UnixWorkloadAttestor(hash_binary=True)
    attestor.attest(PeerCredentials(pid=4242, uid=1000, gid=1000))
    # [unix:uid:1000, unix:user:alice, unix:gid:1000, unix:group:alice,
    #  unix:supplementary_gid:27, unix:supplementary_group:sudo,
    #  unix:path:/usr/bin/app, unix:sha256:9f86d0...]

The uid and gid come from the socket's peer credentials (what the kernel
recorded when the caller connected), never from ``/proc``. Supplementary groups
come from ``/proc/<pid>/status``; the path from ``readlink /proc/<pid>/exe``; the
SHA-256 is computed by reading ``/proc/<pid>/exe`` itself, so it is the exact
file the process executes even if the path was replaced since. Digests are
cached by (path, device, inode, mtime, ctime, size), taken from a ``stat`` of
``/proc/<pid>/exe`` on every call, so a workload that calls often is hashed
once and a process that ``exec``s another binary is seen at its next call.
Configuration is described in ``docs/plugins/workload-attestor-unix.md``.
"""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import pwd
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from attestor.plugin import Plugin
from attestor.selector import Selector
from attestor.settings import Settings
from attestor.workload import (
    DEFAULT_PROC_ROOT,
    PeerCredentials,
    WorkloadAttestationError,
    check_pid,
    process_not_found,
    read_proc_bytes,
)

__all__ = ["DEFAULT_MAX_BINARY_SIZE", "PLUGIN", "UnixSettings", "UnixWorkloadAttestor"]

NAME = "unix"
DEFAULT_MAX_BINARY_SIZE = 64 * 1024 * 1024
DEFAULT_HASH_CACHE_ENTRIES = 1024
DELETED_SUFFIX = " (deleted)"
_CHUNK = 1024 * 1024

log = logging.getLogger(__name__)

_CacheKey = tuple[str, int, int, int, int, int]


class UnixSettings(Settings):
    """``[workload_attestors.unix]``."""

    discover_workload_path: bool = True
    hash_binary: bool = True
    max_binary_size: int = Field(default=DEFAULT_MAX_BINARY_SIZE, ge=1)

    @model_validator(mode="after")
    def _hashing_needs_the_path(self) -> Self:
        if "hash_binary" in self.model_fields_set and self.hash_binary and not (
            self.discover_workload_path
        ):
            raise ValueError(
                "hash_binary = true needs discover_workload_path = true (the binary is found "
                "through /proc/<pid>/exe); set one of them the other way"
            )
        return self


class UnixWorkloadAttestor:
    name = NAME

    def __init__(
        self,
        *,
        discover_workload_path: bool = True,
        hash_binary: bool = True,
        max_binary_size: int = DEFAULT_MAX_BINARY_SIZE,
        proc_root: Path = DEFAULT_PROC_ROOT,
        hash_cache_entries: int = DEFAULT_HASH_CACHE_ENTRIES,
    ) -> None:
        self.discover_workload_path = discover_workload_path
        self.hash_binary = hash_binary and discover_workload_path
        self.max_binary_size = max_binary_size
        self.proc_root = proc_root
        self._hash_cache: OrderedDict[_CacheKey, str] = OrderedDict()
        self._hash_cache_entries = hash_cache_entries
        self._lock = threading.Lock()

    def attest(self, peer: PeerCredentials) -> list[Selector]:
        check_pid(peer.pid)
        selectors = [Selector(NAME, f"uid:{peer.uid}")]
        user = _user_name(peer.uid)
        if user is not None:
            selectors.append(Selector(NAME, f"user:{user}"))
        selectors.append(Selector(NAME, f"gid:{peer.gid}"))
        group = _group_name(peer.gid)
        if group is not None:
            selectors.append(Selector(NAME, f"group:{group}"))
        for gid in self._supplementary_gids(peer.pid):
            selectors.append(Selector(NAME, f"supplementary_gid:{gid}"))
            name = _group_name(gid)
            if name is not None:
                selectors.append(Selector(NAME, f"supplementary_group:{name}"))
        if self.discover_workload_path:
            path, exe = self._binary(peer.pid)
            selectors.append(Selector(NAME, f"path:{path}"))
            key = self._cache_key(path, exe) if exe is not None else None
            if key is not None:
                digest = self._cached_sha256(key) or self._sha256(peer.pid, path)
                if digest is not None:
                    selectors.append(Selector(NAME, f"sha256:{digest}"))
        return selectors

    def _supplementary_gids(self, pid: int) -> list[int]:
        status = b"\n" + read_proc_bytes(pid, "status", self.proc_root)
        start = status.find(b"\nGroups:")
        if start >= 0:
            start += len(b"\nGroups:")
            end = status.find(b"\n", start)
            value = status[start:] if end < 0 else status[start:end]
            try:
                return sorted({int(gid) for gid in value.split()})
            except ValueError:
                pass
        raise WorkloadAttestationError(f"{self.proc_root}/{pid}/status has no readable Groups line")

    def _binary(self, pid: int) -> tuple[str, os.stat_result | None]:
        """The binary's path, and its ``stat`` when it is to be hashed.

        No ``stat`` when hashing is off or the binary was deleted (or replaced)
        since the exec: the path then names another file, or none.
        """
        exe = f"{self.proc_root}/{pid}/exe"
        try:
            target = os.readlink(exe)
            deleted = target.endswith(DELETED_SUFFIX)
            if not (self.hash_binary or deleted):
                return target, None
            # Follows the link to the very file the process executes.
            info = os.stat(exe)
        except OSError as err:
            raise _exe_error(pid, exe, err) from None
        if deleted and info.st_nlink == 0:
            return target.removesuffix(DELETED_SUFFIX), None
        return target, info if self.hash_binary else None

    def _cache_key(self, path: str, info: os.stat_result) -> _CacheKey | None:
        """The digest's cache key, or None when the binary is too large to hash."""
        if info.st_size > self.max_binary_size:
            log.debug(
                "not hashing %s (%d bytes > max_binary_size %d)",
                path,
                info.st_size,
                self.max_binary_size,
            )
            return None
        return _cache_key(path, info)

    def _cached_sha256(self, key: _CacheKey) -> str | None:
        with self._lock:
            cached = self._hash_cache.get(key)
            if cached is not None:
                self._hash_cache.move_to_end(key)
            return cached

    def _sha256(self, pid: int, path: str) -> str | None:
        """Hash the binary (blocking); its cache key is taken again from the open file."""
        exe = f"{self.proc_root}/{pid}/exe"
        try:
            binary = open(exe, "rb")  # noqa: SIM115 -- closed by the with below
        except OSError as err:
            raise _exe_error(pid, exe, err) from None
        with binary:
            before = os.fstat(binary.fileno())
            key = self._cache_key(path, before)
            if key is None:
                return None
            cached = self._cached_sha256(key)
            if cached is not None:
                return cached
            digest = hashlib.sha256()
            read = 0
            while chunk := binary.read(_CHUNK):
                read += len(chunk)
                if read > self.max_binary_size:
                    return None
                digest.update(chunk)
            after = os.fstat(binary.fileno())
        if _cache_key(path, after) != key:
            raise WorkloadAttestationError(
                f"the binary of process {pid} ({path}) changed while it was being hashed; "
                "retry once it is no longer being written"
            )
        hexdigest = digest.hexdigest()
        with self._lock:
            self._hash_cache[key] = hexdigest
            while len(self._hash_cache) > self._hash_cache_entries:
                self._hash_cache.popitem(last=False)
        return hexdigest


def _build(settings: UnixSettings, proc_root: Path) -> UnixWorkloadAttestor:
    return UnixWorkloadAttestor(
        discover_workload_path=settings.discover_workload_path,
        hash_binary=settings.hash_binary,
        max_binary_size=settings.max_binary_size,
        proc_root=proc_root,
    )


PLUGIN = Plugin(NAME, UnixSettings, _build)


def _cache_key(path: str, info: os.stat_result) -> _CacheKey:
    return (
        path,
        info.st_dev,
        info.st_ino,
        info.st_mtime_ns,
        info.st_ctime_ns,
        info.st_size,
    )


def _exe_error(pid: int, exe: str, err: OSError) -> WorkloadAttestationError:
    if isinstance(err, FileNotFoundError | ProcessLookupError):
        # Kernel threads and zombies have no exe either; to a caller they look the same.
        return process_not_found(pid)
    if isinstance(err, PermissionError):
        return WorkloadAttestationError(
            f"permission denied reading {exe}; run the agent as root or with CAP_SYS_PTRACE, "
            "or set discover_workload_path = false in [workload_attestors.unix]"
        )
    return WorkloadAttestationError(f"cannot read {exe}: {err.strerror}")


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None
