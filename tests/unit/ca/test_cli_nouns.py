"""``tessera server`` mounts one module per noun, each only when its name is used.

Every noun resolves and answers ``--help``; a command of one noun imports no
other noun, nor the agent, the sidecar or the server's own machinery; the
"Found N ..." listings share one shape.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ca.cli import server
from ca.cli.common import emit_found
from tessera.cli import cli

# CLI.md's contract: every spire-server noun Tessera has, plus audit and the web console.
NOUNS = [
    "agent", "audit", "bundle", "console", "entry", "federation", "healthcheck", "jwt",
    "localauthority", "run", "token", "x509",
]


def every_command(group: click.Group, ctx: click.Context, path: list[str]) -> list[list[str]]:
    found = [path]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, f"{' '.join([*path, name])} does not resolve"
        if isinstance(command, click.Group):
            sub_ctx = click.Context(command, info_name=name, parent=ctx)
            found += every_command(command, sub_ctx, [*path, name])
        else:
            found.append([*path, name])
    return found


def test_the_server_group_lists_every_noun() -> None:
    assert server.list_commands(click.Context(server)) == NOUNS


def test_every_server_command_resolves_and_answers_help() -> None:
    paths = every_command(server, click.Context(cli, info_name="tessera"), ["server"])
    assert len(paths) == 51
    for path in paths:
        result = CliRunner().invoke(cli, [*path, "--help"], prog_name="tessera")
        assert result.exit_code == 0, (path, result.output)
        assert result.output.startswith(f"Usage: tessera {' '.join(path)} [OPTIONS]")


LOADED = """\
import sys
from pathlib import Path
sys.argv = ["tessera", "server", "entry", "show", "--data-dir", sys.argv[1]]
from tessera.cli import main
try:
    main()
except SystemExit:
    pass
print(" ".join(sorted(sys.modules)))
"""


def test_an_entry_command_imports_only_its_noun(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOADED, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    modules = set(result.stdout.split())
    assert "ca.cli.entry" in modules
    assert {m for m in modules if m.startswith("ca.cli.")} == {"ca.cli.entry", "ca.cli.common"}
    for absent in ("ca.federation.cli", "ca.server", "ca.datastore", "workload_api", "sdk.sidecar",
                   "sqlalchemy", "fastapi", "grpclib", "asyncio"):
        assert absent not in modules


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([], "Found 0 entries\n"),
        ([{"id": "a"}], "Found 1 entry\n\nentry a\n"),
        ([{"id": "a"}, {"id": "b"}], "Found 2 entries\n\nentry a\n\nentry b\n"),
    ],
)
def test_a_listing_says_how_many_it_found_then_each_one(
    items: list[dict[str, str]], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    emit_found("text", "entries", items, ("entry", "entries"), lambda e: f"entry {e['id']}")
    assert capsys.readouterr().out == expected
    emit_found("json", "entries", items, ("entry", "entries"), lambda e: f"entry {e['id']}")
    assert json.loads(capsys.readouterr().out) == {"entries": items}
