"""The root group says which extra to install when a room's third-party dependency is
missing, instead of a traceback.

Each case runs ``tessera`` in a fresh interpreter where one module cannot be
imported (``sys.modules[name] = None`` makes ``import name`` raise
ModuleNotFoundError, as an uninstalled package does).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tessera.cli import missing_extra

RUN_WITHOUT = """\
import sys
sys.modules[sys.argv[1]] = None
sys.argv = ["tessera", *sys.argv[2:]]
from tessera.cli import main
main()
"""


def tessera_without(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, module, *args],
        capture_output=True, text=True, timeout=60,
    )


def test_server_run_without_the_servers_dependencies_names_the_extra(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    result = tessera_without(
        "sqlalchemy", "server", "run", "--trust-domain", "example.org", "--data-dir", str(data_dir)
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "Error: tessera server needs the server extra: pip install 'tessera[server]'\n"
    )
    assert not data_dir.exists()


def test_the_mesh_commands_without_the_servers_dependencies_name_the_extra() -> None:
    result = tessera_without("pydantic", "mesh", "get", "virtualservice")
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "Error: tessera mesh needs the server extra: pip install 'tessera[server]'\n"
    )


def test_the_agent_without_its_dependencies_names_its_extra() -> None:
    result = tessera_without("grpclib", "agent", "run", "--help")
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "Error: tessera agent needs the agent extra: pip install 'tessera[agent]'\n"
    )


def test_the_root_help_lists_a_room_that_cannot_be_imported_with_its_extra() -> None:
    result = tessera_without("grpclib", "--help")
    assert result.returncode == 0
    assert "  agent    Needs the agent extra: pip install 'tessera[agent]'.\n" in result.stdout
    assert "  server   Run and operate a trust domain's server (the CA).\n" in result.stdout


@pytest.mark.parametrize(
    ("command", "module", "expected"),
    [
        ("server", "sqlalchemy.orm", "tessera server needs the server extra: "
                                     "pip install 'tessera[server]'"),
        ("agent", "grpclib", "tessera agent needs the agent extra: "
                             "pip install 'tessera[agent]'"),
        # The commands that run a whole trust domain need both.
        ("up", "sqlalchemy", "tessera up needs the server and agent extras: "
                             "pip install 'tessera[server,agent]'"),
        ("demo", "pydantic", "tessera demo needs the server and agent extras: "
                             "pip install 'tessera[server,agent]'"),
        # The mesh's commands are admin commands: the server extra has what they need.
        ("mesh", "yaml", "tessera mesh needs the server extra: "
                         "pip install 'tessera[server]'"),
        # A module of Tessera's own is a broken install or a bug, not a missing extra.
        ("server", "ca.server", None),
        ("mesh", "mesh.config", None),
        ("agent", "workload_api.agent", None),
        ("server", "tessera.up", None),
        # Commands without an extra of their own.
        ("sidecar", "prometheus_client", None),
        ("init", "httpx", None),
        (None, "httpx", None),
    ],
)
def test_only_a_third_party_module_under_a_room_with_an_extra_is_blamed_on_it(
    command: str | None, module: str, expected: str | None
) -> None:
    err = ModuleNotFoundError(f"No module named {module!r}", name=module)
    refusal = missing_extra(command, err)
    assert (refusal.message if refusal is not None else None) == expected
