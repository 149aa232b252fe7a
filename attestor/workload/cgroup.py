"""The control groups of a process, read from ``/proc/<pid>/cgroup``.

The ``docker``, ``k8s`` and ``systemd`` attestors all start from here. Each
line is ``hierarchy-id:controllers:path``. Under cgroup v1 there is one line per
hierarchy (``4:memory:/docker/<id>``, ``1:name=systemd:/system.slice/...``);
under cgroup v2 a single line ``0::/system.slice/nginx.service``; a hybrid host
has both::

    for line in read_cgroups(pid):
        print(line.hierarchy_id, line.controllers, line.path)

The paths are relative to the cgroup namespace of the *reader*: an agent in the
host's cgroup namespace sees the full path, one in a private namespace sees
``/../..``-style paths, which the attestors still parse by their segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attestor.workload import DEFAULT_PROC_ROOT, WorkloadAttestationError, read_proc_file

__all__ = ["CgroupLine", "parse_cgroups", "read_cgroups"]


@dataclass(frozen=True)
class CgroupLine:
    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str

    @property
    def is_unified(self) -> bool:
        """The cgroup v2 line (``0::/...``)."""
        return self.hierarchy_id == 0 and not self.controllers

    @property
    def segments(self) -> list[str]:
        return [segment for segment in self.path.split("/") if segment]


def read_cgroups(pid: int, proc_root: Path = DEFAULT_PROC_ROOT) -> list[CgroupLine]:
    text = read_proc_file(pid, "cgroup", proc_root)
    try:
        return parse_cgroups(text)
    except ValueError as err:
        raise WorkloadAttestationError(
            f"{proc_root}/{pid}/cgroup is not in the expected format: {err}"
        ) from None


def parse_cgroups(text: str) -> list[CgroupLine]:
    """Parse the content of a ``/proc/<pid>/cgroup`` file; ValueError on a malformed line."""
    lines = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        parts = raw.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            raise ValueError(f"line {raw!r} is not hierarchy-id:controllers:path")
        hierarchy, controllers, path = parts
        lines.append(
            CgroupLine(
                hierarchy_id=int(hierarchy),
                controllers=tuple(c for c in controllers.split(",") if c),
                path=path,
            )
        )
    return lines
