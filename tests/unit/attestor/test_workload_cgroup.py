"""The docker, k8s and systemd attestors against cgroup files the tests write.

No container runtime runs here; the files below are what /proc/<pid>/cgroup
holds for processes in Docker, Kubernetes and systemd units on cgroup v1,
v2 and hybrid hosts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attestor.selector import Selector
from attestor.workload import PeerCredentials, WorkloadAttestationError
from attestor.workload.cgroup import CgroupLine, parse_cgroups
from attestor.workload.docker import DockerWorkloadAttestor
from attestor.workload.k8s import K8sWorkloadAttestor
from attestor.workload.systemd import SystemdWorkloadAttestor

PID = 4242
CONTAINER = "3f5a2a6f7c1e4b0d9a8c7b6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c"
OTHER = "9bca8d63e5a44b6f8c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b"
POD = "2c48913c-b29f-11e7-9350-020968147796"
POD_SYSTEMD = POD.replace("-", "_")

DOCKER_V1 = f"""\
12:hugetlb:/docker/{CONTAINER}
11:pids:/docker/{CONTAINER}
10:net_cls,net_prio:/docker/{CONTAINER}
9:cpu,cpuacct:/docker/{CONTAINER}
8:blkio:/docker/{CONTAINER}
7:memory:/docker/{CONTAINER}
6:devices:/docker/{CONTAINER}
5:freezer:/docker/{CONTAINER}
4:cpuset:/docker/{CONTAINER}
3:perf_event:/docker/{CONTAINER}
2:rdma:/
1:name=systemd:/docker/{CONTAINER}
0::/system.slice/containerd.service
"""
DOCKER_V2 = f"0::/system.slice/docker-{CONTAINER}.scope\n"
CONTAINERD_V2 = f"0::/system.slice/cri-containerd-{CONTAINER}.scope\n"
HOST_V2 = "0::/user.slice/user-1000.slice/session-3.scope\n"

K8S_V1_CGROUPFS = f"""\
11:memory:/kubepods/burstable/pod{POD}/{CONTAINER}
10:cpu,cpuacct:/kubepods/burstable/pod{POD}/{CONTAINER}
9:pids:/kubepods/burstable/pod{POD}/{CONTAINER}
4:devices:/kubepods/burstable/pod{POD}/{CONTAINER}
1:name=systemd:/kubepods/burstable/pod{POD}/{CONTAINER}
"""
K8S_V2_SYSTEMD = (
    "0::/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{POD_SYSTEMD}.slice/cri-containerd-{CONTAINER}.scope\n"
)
K8S_V2_GUARANTEED_CRIO = (
    f"0::/kubepods.slice/kubepods-pod{POD_SYSTEMD}.slice/crio-{CONTAINER}.scope\n"
)
K8S_V1_CONTAINERD_SYSTEMD = f"""\
12:memory:/system.slice/containerd.service/kubepods-burstable-pod{POD_SYSTEMD}.slice:cri-containerd:{CONTAINER}
1:name=systemd:/system.slice/containerd.service/kubepods-burstable-pod{POD_SYSTEMD}.slice:cri-containerd:{CONTAINER}
0::/
"""


def write_cgroup(proc_root: Path, content: str, pid: int = PID) -> PeerCredentials:
    directory = proc_root / str(pid)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cgroup").write_text(content)
    return PeerCredentials(pid=pid, uid=0, gid=0)


def docker(tmp_path: Path, content: str) -> list[Selector]:
    return DockerWorkloadAttestor(proc_root=tmp_path).attest(write_cgroup(tmp_path, content))


def k8s(tmp_path: Path, content: str) -> list[Selector]:
    return K8sWorkloadAttestor(proc_root=tmp_path).attest(write_cgroup(tmp_path, content))


def systemd(tmp_path: Path, content: str, *, include_scopes: bool = False) -> list[Selector]:
    attestor = SystemdWorkloadAttestor(proc_root=tmp_path, include_scopes=include_scopes)
    return attestor.attest(write_cgroup(tmp_path, content))


# -- parsing -----------------------------------------------------------------------------


def test_parse_cgroups_v1_and_v2_lines() -> None:
    lines = parse_cgroups("10:net_cls,net_prio:/docker/abc\n1:name=systemd:/a:b\n0::/\n")

    assert lines == [
        CgroupLine(10, ("net_cls", "net_prio"), "/docker/abc"),
        CgroupLine(1, ("name=systemd",), "/a:b"),
        CgroupLine(0, (), "/"),
    ]
    assert [line.is_unified for line in lines] == [False, False, True]


def test_malformed_cgroup_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WorkloadAttestationError) as excinfo:
        docker(tmp_path, "this is not a cgroup line\n")

    assert excinfo.value.message == (
        f"{tmp_path}/{PID}/cgroup is not in the expected format: "
        "line 'this is not a cgroup line' is not hierarchy-id:controllers:path"
    )


@pytest.mark.parametrize("attestor_type", [DockerWorkloadAttestor, K8sWorkloadAttestor])
def test_missing_process_is_refused(tmp_path: Path, attestor_type: type) -> None:
    with pytest.raises(WorkloadAttestationError) as excinfo:
        attestor_type(proc_root=tmp_path).attest(PeerCredentials(pid=PID, uid=0, gid=0))

    assert excinfo.value.message == (
        f"process {PID} does not exist; it may have exited before it could be attested"
    )


def test_every_attestor_reads_the_real_current_process() -> None:
    me = PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
    for attestor in (DockerWorkloadAttestor(), K8sWorkloadAttestor(), SystemdWorkloadAttestor()):
        assert all(s.type == attestor.name for s in attestor.attest(me))


# -- docker ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [DOCKER_V1, DOCKER_V2, CONTAINERD_V2],
    ids=["v1-cgroupfs", "v2-systemd-scope", "v2-cri-containerd"],
)
def test_docker_finds_the_container_id(tmp_path: Path, content: str) -> None:
    assert docker(tmp_path, content) == [Selector("docker", f"id:{CONTAINER}")]


def test_docker_takes_the_innermost_of_nested_containers(tmp_path: Path) -> None:
    nested = f"0::/docker/{OTHER}/docker/{CONTAINER}\n"

    assert docker(tmp_path, nested) == [Selector("docker", f"id:{CONTAINER}")]


@pytest.mark.parametrize(
    "content",
    [HOST_V2, "0::/system.slice/nginx.service\n", "0::/docker/not-a-container-id\n", "0::/\n"],
)
def test_docker_outside_a_container_gives_no_selectors(tmp_path: Path, content: str) -> None:
    assert docker(tmp_path, content) == []


def test_docker_id_must_be_a_whole_segment(tmp_path: Path) -> None:
    assert docker(tmp_path, f"0::/system.slice/docker-{CONTAINER}0.scope\n") == []
    assert docker(tmp_path, f"0::/somewhere/{CONTAINER}\n") == []


def test_docker_refuses_two_different_containers(tmp_path: Path) -> None:
    content = f"4:memory:/docker/{CONTAINER}\n1:name=systemd:/docker/{OTHER}\n"

    with pytest.raises(WorkloadAttestationError) as excinfo:
        docker(tmp_path, content)

    assert excinfo.value.message == (
        f"process {PID} appears in more than one container ({CONTAINER}, {OTHER}); "
        "refusing to choose one"
    )


# -- k8s ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [K8S_V1_CGROUPFS, K8S_V2_SYSTEMD, K8S_V2_GUARANTEED_CRIO, K8S_V1_CONTAINERD_SYSTEMD],
    ids=["v1-cgroupfs", "v2-systemd-besteffort", "v2-guaranteed-crio", "v1-containerd-systemd"],
)
def test_k8s_finds_pod_uid_and_container(tmp_path: Path, content: str) -> None:
    assert k8s(tmp_path, content) == [
        Selector("k8s", f"pod-uid:{POD}"),
        Selector("k8s", f"container-id:{CONTAINER}"),
    ]


def test_k8s_pod_without_a_container_segment(tmp_path: Path) -> None:
    content = f"0::/kubepods/besteffort/pod{POD}\n"

    assert k8s(tmp_path, content) == [Selector("k8s", f"pod-uid:{POD}")]


def test_k8s_static_pod_uid_is_a_hash(tmp_path: Path) -> None:
    static = "7f4c5c2a0d9e8b7a6f5e4d3c2b1a0f9e"
    content = f"0::/kubepods/burstable/pod{static}/{CONTAINER}\n"

    assert k8s(tmp_path, content)[0] == Selector("k8s", f"pod-uid:{static}")


@pytest.mark.parametrize(
    "content",
    [DOCKER_V1, DOCKER_V2, HOST_V2, f"0::/system.slice/pod{POD}/{CONTAINER}\n"],
    ids=["docker-v1", "docker-v2", "host", "pod-outside-kubepods"],
)
def test_k8s_outside_a_pod_gives_no_selectors(tmp_path: Path, content: str) -> None:
    assert k8s(tmp_path, content) == []


def test_k8s_refuses_two_different_pods(tmp_path: Path) -> None:
    other_pod = "11111111-2222-3333-4444-555555555555"
    content = (
        f"4:memory:/kubepods/burstable/pod{POD}/{CONTAINER}\n"
        f"1:name=systemd:/kubepods/burstable/pod{other_pod}/{CONTAINER}\n"
    )

    with pytest.raises(WorkloadAttestationError) as excinfo:
        k8s(tmp_path, content)

    assert excinfo.value.message == (
        f"process {PID} appears in more than one pod or container "
        f"({other_pod}/{CONTAINER}, {POD}/{CONTAINER}); refusing to choose one"
    )


# -- systemd -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("0::/system.slice/nginx.service\n", ["unit:nginx.service"]),
        ("0::/system.slice/system-getty.slice/getty@tty1.service\n", ["unit:getty@tty1.service"]),
        # cgroup v1: the name=systemd hierarchy, not the controllers
        (
            "7:memory:/\n4:cpu,cpuacct:/system.slice\n1:name=systemd:/system.slice/sshd.service\n",
            ["unit:sshd.service"],
        ),
        # hybrid host: the unified line wins
        (
            "1:name=systemd:/system.slice/old.service\n0::/system.slice/postgresql.service\n",
            ["unit:postgresql.service"],
        ),
        # a delegated subtree below the unit belongs to the unit
        (
            "0::/system.slice/containerd.service/sub/worker.service\n",
            ["unit:containerd.service"],
        ),
        # seen from a private cgroup namespace
        ("0::/../../system.slice/nginx.service\n", ["unit:nginx.service"]),
    ],
)
def test_systemd_system_units(tmp_path: Path, content: str, expected: list[str]) -> None:
    assert systemd(tmp_path, content) == [Selector("systemd", value) for value in expected]


def test_systemd_user_unit_cannot_pass_for_a_system_unit(tmp_path: Path) -> None:
    content = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service\n"

    assert systemd(tmp_path, content) == [
        Selector("systemd", "unit:user@1000.service"),
        Selector("systemd", "user_unit:nginx.service"),
    ]


@pytest.mark.parametrize(
    ("content", "without_scopes", "with_scopes"),
    [
        (HOST_V2, [], ["unit:session-3.scope"]),
        (DOCKER_V2, [], [f"unit:docker-{CONTAINER}.scope"]),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1a2b3.scope\n",
            ["unit:user@1000.service"],
            ["unit:user@1000.service", "user_unit:run-r1a2b3.scope"],
        ),
        ("0::/init.scope\n", [], ["unit:init.scope"]),
    ],
)
def test_systemd_scopes_only_when_configured(
    tmp_path: Path, content: str, without_scopes: list[str], with_scopes: list[str]
) -> None:
    assert systemd(tmp_path, content) == [Selector("systemd", v) for v in without_scopes]
    assert systemd(tmp_path, content, include_scopes=True) == [
        Selector("systemd", v) for v in with_scopes
    ]


@pytest.mark.parametrize(
    "content",
    ["0::/\n", DOCKER_V1.replace("0::/system.slice/containerd.service\n", ""), K8S_V1_CGROUPFS],
    ids=["root", "docker-v1", "k8s-v1"],
)
def test_systemd_outside_a_unit_gives_no_selectors(tmp_path: Path, content: str) -> None:
    assert systemd(tmp_path, content, include_scopes=True) == []
