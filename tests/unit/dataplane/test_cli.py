"""``tessera sidecar run``'s flags, checked before anything starts, and the extra it needs.

Each case runs ``tessera`` in a fresh interpreter; where a module must be missing,
``sys.modules[name] = None`` makes importing it fail as an uninstalled package does.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

RUN_WITHOUT = """\
import sys
for name in sys.argv[1].split(","):
    if name:
        sys.modules[name] = None
sys.argv = ["tessera", *sys.argv[2:]]
from tessera.cli import main
main()
"""
RUN = ["sidecar", "run", "--service", "users-service", "--spiffe-id",
       "spiffe://example.org/users", "--app", "127.0.0.1:8080",
       "--socket", "/nonexistent/agent.sock"]  # fmt: skip


def tessera_without(modules: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RUN_WITHOUT, modules, *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize("module", ["yaml", "pydantic", "re2"])
def test_run_without_the_mesh_s_packages_names_the_extra(module: str) -> None:
    result = tessera_without(module, *RUN)
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "Error: tessera sidecar run needs the mesh extra: pip install 'tessera[mesh]'\n")


def test_files_and_proxy_need_none_of_them() -> None:
    for command in ("files", "proxy"):
        result = tessera_without("yaml,pydantic,re2", "sidecar", command, "--help")
        assert result.returncode == 0, result.stderr
    result = tessera_without("yaml,pydantic,re2", "sidecar", "--help")
    assert "  run    Serve an app as an instance of a mesh Service" in result.stdout


@pytest.mark.parametrize(("flags", "error"), [
    (["--app", "8080"], "--app '8080' is not HOST:PORT, e.g. 127.0.0.1:8080"),
    (["--inbound", "15006"], "--inbound '15006' is not HOST:PORT, e.g. 0.0.0.0:15006"),
    (["--label", "app"], "--label 'app' is not K=V, e.g. --label app=users"),
    (["--label", "app=a", "--label", "app=b"], "--label app is given twice; give each label once"),
    (["--label", "app=not valid"], "--label: label app='not valid': the value "),
    (["--service", "Users_Service"], "--service 'Users_Service' "),
    (["--spiffe-id", "spiffe://example.org"], "--spiffe-id 'spiffe://example.org' names a trust "
                                              "domain, not a workload"),
    (["--health-bind", "15020"], "--health-bind '15020' is not HOST:PORT"),
])  # fmt: skip
def test_a_malformed_flag_is_a_usage_error(flags: list[str], error: str) -> None:
    result = tessera_without("", *RUN, *flags)
    assert (result.returncode, result.stdout) == (2, "")
    assert f"Error: {error}" in result.stderr, result.stderr


def test_without_an_agent_it_says_what_to_do() -> None:
    result = tessera_without("", *RUN, "--timeout", "0")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "Error: no Tessera agent is listening on /nonexistent/agent.sock (waited 0s); start one "
        "with 'tessera agent run', or pass its socket with --socket\n")
