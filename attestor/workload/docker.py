"""The ``docker`` workload attestor: the id of the container the caller runs in.

    attestor = DockerWorkloadAttestor()
    attestor.attest(PeerCredentials(pid=4242, uid=0, gid=0))
    # [docker:id:3f5a...c2 (64 hex digits)]

The id is read from ``/proc/<pid>/cgroup``, whose paths the container runtime
sets up. Recognised forms, cgroup v1 and v2 alike:

- ``/docker/<id>`` (cgroupfs driver), e.g. ``4:memory:/docker/<id>``
- ``docker-<id>.scope`` (systemd driver), e.g. ``0::/system.slice/docker-<id>.scope``
- ``cri-containerd-<id>.scope`` (containerd), e.g.
  ``0::/system.slice/cri-containerd-<id>.scope``

A process outside any container gets no selectors; that is not an error. A
process whose cgroup lines name two different containers is refused rather
than guessed about. Configuration: none (see
``docs/plugins/workload-attestor-docker.md``).
"""

from __future__ import annotations

import re
from pathlib import Path

from attestor.plugin import Plugin
from attestor.selector import Selector
from attestor.settings import NoSettings
from attestor.workload import (
    DEFAULT_PROC_ROOT,
    PeerCredentials,
    WorkloadAttestationError,
)
from attestor.workload.cgroup import CgroupLine, read_cgroups

__all__ = ["PLUGIN", "DockerWorkloadAttestor", "container_id_from_cgroups"]

NAME = "docker"
_SCOPE = re.compile(r"(?:docker|cri-containerd)-([0-9a-f]{64})\.scope")
_ID = re.compile(r"[0-9a-f]{64}")


class DockerWorkloadAttestor:
    name = NAME

    def __init__(self, *, proc_root: Path = DEFAULT_PROC_ROOT) -> None:
        self.proc_root = proc_root

    def attest(self, peer: PeerCredentials) -> list[Selector]:
        cgroups = read_cgroups(peer.pid, self.proc_root)
        container_id = container_id_from_cgroups(peer.pid, cgroups)
        if container_id is None:
            return []
        return [Selector(NAME, f"id:{container_id}")]


def _build(settings: NoSettings, proc_root: Path) -> DockerWorkloadAttestor:
    return DockerWorkloadAttestor(proc_root=proc_root)


PLUGIN = Plugin(NAME, NoSettings, _build)


def container_id_from_cgroups(pid: int, cgroups: list[CgroupLine]) -> str | None:
    """The one container id the cgroup lines name, or None outside a container."""
    found = {cid for line in cgroups if (cid := _container_id(line.segments)) is not None}
    if len(found) > 1:
        raise WorkloadAttestationError(
            f"process {pid} appears in more than one container ({', '.join(sorted(found))}); "
            "refusing to choose one"
        )
    return found.pop() if found else None


def _container_id(segments: list[str]) -> str | None:
    """The innermost container id in one cgroup path."""
    container_id = None
    for index, segment in enumerate(segments):
        scope = _SCOPE.fullmatch(segment)
        if scope is not None:
            container_id = scope.group(1)
        elif index > 0 and segments[index - 1] == "docker" and _ID.fullmatch(segment):
            container_id = segment
    return container_id
