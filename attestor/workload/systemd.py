"""The ``systemd`` workload attestor: the unit the caller runs in.

    attestor = SystemdWorkloadAttestor()
    attestor.attest(PeerCredentials(pid=4242, uid=33, gid=33))
    # [systemd:unit:nginx.service]

systemd puts every unit in its own control group, so the unit is read from
``/proc/<pid>/cgroup`` (the cgroup v2 line ``0::/...``, else the v1
``name=systemd`` line):

- ``/system.slice/nginx.service`` gives ``systemd:unit:nginx.service``;
- ``/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service`` gives
  ``systemd:unit:user@1000.service`` and ``systemd:user_unit:foo.service``;
- ``/user.slice/user-1000.slice/session-3.scope`` gives nothing, or
  ``systemd:unit:session-3.scope`` with ``include_scopes = true``;
- ``/docker/<id>``, ``/kubepods/...`` give nothing: not a systemd unit.

A user's own units live under their ``user@<uid>.service``, and any user may
name a unit ``nginx.service``; so user units get a selector of their own,
``user_unit``, and never a ``unit`` selector that could pass for a system
service. Scopes (login sessions, ``systemd-run --scope``, containers' scopes)
are left out unless ``include_scopes = true``: their names are generated, not
chosen by an operator. Configuration is described in
``docs/plugins/workload-attestor-systemd.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

from attestor.plugin import Plugin
from attestor.selector import Selector
from attestor.settings import Settings
from attestor.workload import DEFAULT_PROC_ROOT, PeerCredentials
from attestor.workload.cgroup import CgroupLine, read_cgroups

__all__ = ["PLUGIN", "SystemdSettings", "SystemdWorkloadAttestor", "units_from_cgroups"]

NAME = "systemd"
_USER_MANAGER = re.compile(r"user@\d+\.service")
_UNIT_SUFFIXES = (".service", ".scope")


class SystemdSettings(Settings):
    """``[workload_attestors.systemd]``."""

    include_scopes: bool = False


class SystemdWorkloadAttestor:
    name = NAME

    def __init__(
        self, *, include_scopes: bool = False, proc_root: Path = DEFAULT_PROC_ROOT
    ) -> None:
        self.include_scopes = include_scopes
        self.proc_root = proc_root

    def attest(self, peer: PeerCredentials) -> list[Selector]:
        system_unit, user_unit = units_from_cgroups(read_cgroups(peer.pid, self.proc_root))
        selectors = []
        if system_unit is not None and self._wanted(system_unit):
            selectors.append(Selector(NAME, f"unit:{system_unit}"))
        if user_unit is not None and self._wanted(user_unit):
            selectors.append(Selector(NAME, f"user_unit:{user_unit}"))
        return selectors

    def _wanted(self, unit: str) -> bool:
        return unit.endswith(".service") or self.include_scopes


def _build(settings: SystemdSettings, proc_root: Path) -> SystemdWorkloadAttestor:
    return SystemdWorkloadAttestor(include_scopes=settings.include_scopes, proc_root=proc_root)


PLUGIN = Plugin(NAME, SystemdSettings, _build)


def units_from_cgroups(cgroups: list[CgroupLine]) -> tuple[str | None, str | None]:
    """(system unit, user unit) of the process, each None when there is none."""
    line = _systemd_line(cgroups)
    if line is None:
        return None, None
    segments = [segment for segment in line.segments if segment != ".."]
    system_unit, rest = _first_unit(segments)
    if system_unit is None or not _USER_MANAGER.fullmatch(system_unit):
        return system_unit, None
    user_unit, _ = _first_unit(rest)
    return system_unit, user_unit


def _systemd_line(cgroups: list[CgroupLine]) -> CgroupLine | None:
    for line in cgroups:
        if line.is_unified:
            return line
    for line in cgroups:
        if "name=systemd" in line.controllers:
            return line
    return None


def _first_unit(segments: list[str]) -> tuple[str | None, list[str]]:
    """The outermost unit below the slices, and the segments under it.

    Below a unit, the cgroup tree belongs to the unit itself (delegation), so
    only the outermost unit is the system manager's word.
    """
    for index, segment in enumerate(segments):
        if segment.endswith(".slice"):
            continue
        if segment.endswith(_UNIT_SUFFIXES):
            return segment, segments[index + 1 :]
        return None, []
    return None, []
