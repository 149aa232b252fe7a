"""The ``k8s`` workload attestor: the pod and container the caller runs in.

    attestor = K8sWorkloadAttestor()
    attestor.attest(PeerCredentials(pid=4242, uid=0, gid=0))
    # [k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796, k8s:container-id:9bca8d63...]

Both come from ``/proc/<pid>/cgroup``, which the kubelet and the container
runtime set up. Recognised forms:

- cgroupfs driver (v1 or v2):
  ``/kubepods/burstable/pod<uid>/<container-id>``
- systemd driver (v1 or v2):
  ``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/``
  ``cri-containerd-<container-id>.scope`` (also ``docker-`` and ``crio-`` scopes);
  the systemd driver writes the pod UID with ``_`` for ``-``, which is normalised
  back to the UID Kubernetes shows.
- containerd with the systemd driver under cgroup v1:
  ``/system.slice/containerd.service/kubepods-burstable-pod<uid>.slice:cri-containerd:<id>``

A process outside a pod gets no selectors. Only what the cgroup says is used:
selectors such as the namespace, service account or pod labels need the
kubelet's API and are left to a later plugin. Configuration: none (see
``docs/plugins/workload-attestor-k8s.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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

__all__ = ["PLUGIN", "K8sWorkloadAttestor", "PodContainer", "pod_from_cgroups"]

NAME = "k8s"
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
# "pod<uid>" (cgroupfs) or "kubepods[-<qos>]-pod<uid>.slice" (systemd).
_POD = re.compile(rf"pod({_UID})|kubepods(?:-[a-z]+)?-pod({_UID})\.slice")
_CONTAINER = re.compile(r"([0-9a-f]{64})|(?:cri-containerd|docker|crio)-([0-9a-f]{64})\.scope")
# containerd with systemd cgroups under cgroup v1 names the container in the same segment:
# "kubepods-burstable-pod<uid>.slice:cri-containerd:<container-id>".
_POD_AND_CONTAINER = re.compile(
    rf"kubepods(?:-[a-z]+)?-pod({_UID})\.slice:(?:cri-containerd|docker|crio):([0-9a-f]{{64}})"
)


@dataclass(frozen=True)
class PodContainer:
    pod_uid: str
    container_id: str | None


class K8sWorkloadAttestor:
    name = NAME

    def __init__(self, *, proc_root: Path = DEFAULT_PROC_ROOT) -> None:
        self.proc_root = proc_root

    def attest(self, peer: PeerCredentials) -> list[Selector]:
        pod = pod_from_cgroups(peer.pid, read_cgroups(peer.pid, self.proc_root))
        if pod is None:
            return []
        selectors = [Selector(NAME, f"pod-uid:{pod.pod_uid}")]
        if pod.container_id is not None:
            selectors.append(Selector(NAME, f"container-id:{pod.container_id}"))
        return selectors


def _build(settings: NoSettings, proc_root: Path) -> K8sWorkloadAttestor:
    return K8sWorkloadAttestor(proc_root=proc_root)


PLUGIN = Plugin(NAME, NoSettings, _build)


def pod_from_cgroups(pid: int, cgroups: list[CgroupLine]) -> PodContainer | None:
    """The pod (and container) the cgroup lines name, or None outside a pod."""
    found = {pod for line in cgroups if (pod := _pod(line.segments)) is not None}
    if not found:
        return None
    # v1 controllers that do not nest per container (rare) name the pod only.
    with_container = {pod for pod in found if pod.container_id is not None}
    candidates = with_container or found
    if len(candidates) > 1:
        described = ", ".join(
            sorted(f"{pod.pod_uid}/{pod.container_id or '-'}" for pod in candidates)
        )
        raise WorkloadAttestationError(
            f"process {pid} appears in more than one pod or container ({described}); "
            "refusing to choose one"
        )
    chosen = candidates.pop()
    if any(pod.pod_uid != chosen.pod_uid for pod in found):
        raise WorkloadAttestationError(
            f"process {pid} appears in more than one pod; refusing to choose one"
        )
    return chosen


def _pod(segments: list[str]) -> PodContainer | None:
    for index, segment in enumerate(segments):
        if not segment.startswith("kubepods"):
            continue
        for position in range(index, len(segments)):
            combined = _POD_AND_CONTAINER.fullmatch(segments[position])
            if combined is not None:
                return PodContainer(combined.group(1).replace("_", "-"), combined.group(2))
            pod = _POD.fullmatch(segments[position])
            if pod is None:
                continue
            uid = (pod.group(1) or pod.group(2)).replace("_", "-")
            container_id = None
            if position + 1 < len(segments):
                container = _CONTAINER.fullmatch(segments[position + 1])
                if container is not None:
                    container_id = container.group(1) or container.group(2)
            return PodContainer(uid, container_id)
        return None
    return None
