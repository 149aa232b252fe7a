"""The workload attestor registry, its configuration errors and the pid-reuse guard."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from attestor.plugin import PluginConfig
from attestor.selector import Selector
from attestor.workload import (
    WORKLOAD_ATTESTORS,
    PeerCredentials,
    WorkloadAttestationError,
    WorkloadAttestor,
    attest_with_pid_guard,
    attest_workload,
    load_workload_attestor,
    process_start_time,
)
from attestor.workload.docker import DockerWorkloadAttestor
from attestor.workload.k8s import K8sWorkloadAttestor
from attestor.workload.systemd import SystemdWorkloadAttestor
from attestor.workload.unix import UnixWorkloadAttestor
from sdk.errors import ConfigError

PID = 4242
PEER = PeerCredentials(pid=PID, uid=1000, gid=1000)


def stat_line(start_time: int, comm: str = "app") -> str:
    """A /proc/<pid>/stat line; starttime is field 22."""
    fields = ["S", "1", str(PID), str(PID), "0", "-1", "4194560"] + ["0"] * 12
    fields.append(str(start_time))
    fields += ["12345678", "300"]
    return f"{PID} ({comm}) " + " ".join(fields) + "\n"


def write_stat(proc_root: Path, start_time: int, comm: str = "app") -> None:
    directory = proc_root / str(PID)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stat").write_text(stat_line(start_time, comm))


class FixedAttestor:
    def __init__(self, name: str, *values: str) -> None:
        self.name = name
        self.values = values

    def attest(self, peer: PeerCredentials) -> list[Selector]:
        return [Selector(self.name, value) for value in self.values]


class ReplacingAttestor:
    """Plays the kernel: the process exits and another one takes its pid meanwhile."""

    name = "fake"

    def __init__(self, proc_root: Path, *, new_start_time: int | None) -> None:
        self.proc_root = proc_root
        self.new_start_time = new_start_time

    def attest(self, peer: PeerCredentials) -> list[Selector]:
        if self.new_start_time is None:
            shutil.rmtree(self.proc_root / str(peer.pid))
        else:
            write_stat(self.proc_root, self.new_start_time)
        return [Selector("fake", "attested")]


# -- the registry ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected_type"),
    [
        ("unix", UnixWorkloadAttestor),
        ("docker", DockerWorkloadAttestor),
        ("k8s", K8sWorkloadAttestor),
        ("systemd", SystemdWorkloadAttestor),
    ],
)
def test_load_by_name(tmp_path: Path, name: str, expected_type: type) -> None:
    attestor = load_workload_attestor(name, {}, proc_root=tmp_path)

    assert isinstance(attestor, expected_type)
    assert attestor.name == name
    assert vars(attestor)["proc_root"] == tmp_path


def test_unix_settings_are_applied() -> None:
    config = {"discover_workload_path": True, "hash_binary": False, "max_binary_size": 1024}

    attestor = load_workload_attestor("unix", config)

    assert isinstance(attestor, UnixWorkloadAttestor)
    assert (attestor.discover_workload_path, attestor.hash_binary) == (True, False)
    assert attestor.max_binary_size == 1024
    assert attestor.proc_root == Path("/proc")


def test_unix_defaults() -> None:
    attestor = load_workload_attestor("unix", {})

    assert isinstance(attestor, UnixWorkloadAttestor)
    assert (attestor.discover_workload_path, attestor.hash_binary) == (True, True)
    assert attestor.max_binary_size == 64 * 1024 * 1024


def test_turning_off_path_discovery_turns_off_hashing() -> None:
    attestor = load_workload_attestor("unix", {"discover_workload_path": False})

    assert isinstance(attestor, UnixWorkloadAttestor)
    assert attestor.hash_binary is False


def test_systemd_include_scopes() -> None:
    attestor = load_workload_attestor("systemd", {"include_scopes": True})

    assert isinstance(attestor, SystemdWorkloadAttestor)
    assert attestor.include_scopes is True


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        (
            "kubelet",
            {},
            "unknown workload attestor 'kubelet'; "
            "known workload attestors: docker, k8s, systemd, unix",
        ),
        (
            "unix",
            {"hash_binaries": True, "colour": "blue"},
            "[workload_attestors.unix] hash_binaries: unknown setting; colour: unknown setting; "
            "known settings: discover_workload_path, hash_binary, max_binary_size",
        ),
        (
            "unix",
            {"hash_binary": "yes"},
            "[workload_attestors.unix] hash_binary: must be true or false, got 'yes'",
        ),
        (
            "unix",
            {"discover_workload_path": 1},
            "[workload_attestors.unix] discover_workload_path: must be true or false, got 1",
        ),
        (
            "unix",
            {"max_binary_size": "64MiB"},
            "[workload_attestors.unix] max_binary_size: must be a whole number, got '64MiB'",
        ),
        (
            "unix",
            {"max_binary_size": 0},
            "[workload_attestors.unix] max_binary_size: must be at least 1, got 0",
        ),
        (
            "unix",
            {"max_binary_size": True},
            "[workload_attestors.unix] max_binary_size: must be a whole number, got True",
        ),
        (
            "unix",
            {"discover_workload_path": False, "hash_binary": True},
            "[workload_attestors.unix] hash_binary = true needs discover_workload_path = true "
            "(the binary is found through /proc/<pid>/exe); set one of them the other way",
        ),
        (
            "unix",
            {"hash_binary": "yes", "max_binary_size": -1, "colour": "blue"},
            "[workload_attestors.unix] hash_binary: must be true or false, got 'yes'; "
            "max_binary_size: must be at least 1, got -1; colour: unknown setting; "
            "known settings: discover_workload_path, hash_binary, max_binary_size",
        ),
        (
            "unix",
            {"max_binary_size": 1.5},
            "[workload_attestors.unix] max_binary_size: must be a whole number, got 1.5",
        ),
        (
            "docker",
            {"socket": "/var/run/docker.sock"},
            "[workload_attestors.docker] socket: unknown setting; it takes no settings",
        ),
        (
            "k8s",
            {"kubelet_port": 10250, "node_name": "n1"},
            "[workload_attestors.k8s] kubelet_port: unknown setting; node_name: unknown setting; "
            "it takes no settings",
        ),
        (
            "systemd",
            {"include_scopes": "no"},
            "[workload_attestors.systemd] include_scopes: must be true or false, got 'no'",
        ),
        (
            "systemd",
            {"scopes": True},
            "[workload_attestors.systemd] scopes: unknown setting; known settings: include_scopes",
        ),
    ],
)
def test_config_errors(name: str, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_workload_attestor(name, config)

    assert excinfo.value.message == message


def test_the_registry_names_the_built_ins() -> None:
    assert WORKLOAD_ATTESTORS.names() == ("docker", "k8s", "systemd", "unix")


def test_the_registry_loads_from_a_plugin_config(tmp_path: Path) -> None:
    attestor = WORKLOAD_ATTESTORS.load(PluginConfig("systemd", {"include_scopes": True}), tmp_path)

    assert isinstance(attestor, SystemdWorkloadAttestor)
    assert (attestor.include_scopes, attestor.proc_root) == (True, tmp_path)


# -- union of attestors ------------------------------------------------------------------


def test_attest_workload_is_the_union_of_every_attestor() -> None:
    attestors: list[WorkloadAttestor] = [
        FixedAttestor("unix", "uid:1000", "gid:1000"),
        FixedAttestor("systemd", "unit:app.service"),
        FixedAttestor("unix", "uid:1000"),
    ]

    assert attest_workload(attestors, PEER) == frozenset(
        {
            Selector("unix", "uid:1000"),
            Selector("unix", "gid:1000"),
            Selector("systemd", "unit:app.service"),
        }
    )


def test_attest_workload_with_no_attestors_is_empty() -> None:
    assert attest_workload([], PEER) == frozenset()


# -- process start time and the pid-reuse guard ------------------------------------------


def test_process_start_time_of_the_real_process() -> None:
    mine = process_start_time(os.getpid())
    own_stat = Path("/proc/self/stat").read_text()

    assert mine == int(own_stat.rpartition(")")[2].split()[19])
    assert mine > 0


@pytest.mark.parametrize("comm", ["app", "my app", "a) (b c)", ") 1 2 3 (", "(x)"])
def test_process_start_time_survives_odd_program_names(tmp_path: Path, comm: str) -> None:
    write_stat(tmp_path, 987654, comm)

    assert process_start_time(PID, tmp_path) == 987654


def test_process_start_time_of_a_truncated_stat(tmp_path: Path) -> None:
    (tmp_path / str(PID)).mkdir()
    (tmp_path / str(PID) / "stat").write_text(f"{PID} (app) S 1 2 3\n")

    with pytest.raises(WorkloadAttestationError) as excinfo:
        process_start_time(PID, tmp_path)

    assert excinfo.value.message == f"{tmp_path}/{PID}/stat is not in the expected format"


def test_process_start_time_of_a_missing_process(tmp_path: Path) -> None:
    with pytest.raises(WorkloadAttestationError) as excinfo:
        process_start_time(PID, tmp_path)

    assert excinfo.value.message == (
        f"process {PID} does not exist; it may have exited before it could be attested"
    )


def test_pid_guard_passes_when_the_process_is_the_same(tmp_path: Path) -> None:
    write_stat(tmp_path, 1000)
    attestors = [FixedAttestor("unix", "uid:1000")]

    assert attest_with_pid_guard(attestors, PEER, proc_root=tmp_path) == frozenset(
        {Selector("unix", "uid:1000")}
    )


def test_pid_guard_passes_for_the_real_current_process() -> None:
    me = PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
    attestor = UnixWorkloadAttestor(hash_binary=False)

    selectors = attest_with_pid_guard([attestor], me)

    assert Selector("unix", f"uid:{os.getuid()}") in selectors


@pytest.mark.parametrize("new_start_time", [2000, None], ids=["replaced", "exited"])
def test_pid_guard_refuses_a_replaced_or_exited_process(
    tmp_path: Path, new_start_time: int | None
) -> None:
    write_stat(tmp_path, 1000)
    attestors: list[WorkloadAttestor] = [
        FixedAttestor("unix", "uid:1000"),
        ReplacingAttestor(tmp_path, new_start_time=new_start_time),
    ]

    with pytest.raises(WorkloadAttestationError) as excinfo:
        attest_with_pid_guard(attestors, PEER, proc_root=tmp_path)

    assert excinfo.value.message == f"process {PID} exited or was replaced during attestation"


def test_pid_guard_refuses_a_process_gone_before_attestation(tmp_path: Path) -> None:
    with pytest.raises(WorkloadAttestationError) as excinfo:
        attest_with_pid_guard([FixedAttestor("unix", "uid:1000")], PEER, proc_root=tmp_path)

    assert excinfo.value.message == (
        f"process {PID} does not exist; it may have exited before it could be attested"
    )
