"""docs/sidecar.md, "Three ports, three meanings": the two instances its commands start are
the Service's port 80 to a caller, as the explanation the page shows says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from mesh import Catalog, explain
from tests.unit.mesh.meshes import configured, instance

PAGE = Path(__file__).resolve().parents[3] / "docs" / "sidecar.md"
SECTION = PAGE.read_text().partition("## `tessera sidecar run`")[2]
PORTS = SECTION.partition("**Three ports, three meanings.**")[2]
USERS = "spiffe://example.org/users"


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_instances_the_commands_start_serve_the_service_s_port() -> None:
    [service_yaml] = fenced(SECTION, "yaml")[:1]
    [commands] = fenced(PORTS, "sh")[:1]
    [shown] = fenced(PORTS, "text")[:1]
    runs = [shlex.split(line) for line in commands.splitlines()]
    assert [argv[:3] for argv in runs] == [["tessera", "sidecar", "run"]] * 2
    # Apps and sidecars on ports of their own; none of them on the Service's port, 80.
    assert {flag(argv, "--service") for argv in runs} == {"users-service"}
    listening = [flag(argv, name) for argv in runs for name in ("--app", "--inbound")]
    assert len(set(listening)) == 4
    assert all(not address.endswith(":80") for address in listening)
    catalog = Catalog([
        instance(flag(argv, "--service"), flag(argv, "--inbound"),
                 dict([flag(argv, "--label").split("=")]), spiffe_id=flag(argv, "--spiffe-id"))
        for argv in runs
    ])  # fmt: skip
    explanation = explain(configured(service_yaml), catalog, caller="spiffe://example.org/web",
                          service="users-service", path="/api/users")  # fmt: skip
    assert explanation.allowed
    assert "\n".join(explanation.lines()) + "\n" == shown
