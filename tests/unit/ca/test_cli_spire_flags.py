"""SPIRE's single-dash camelCase flags get the Tessera spelling, for every command.

``spire-server entry create -parentID ...`` becomes ``tessera server entry
create --parent-id ...`` (CLI.md). click alone reads ``-parentID`` as the short
options ``-p -a ...`` and says "No such option '-p'"; the root group turns that
into a usage error (exit 2) naming the flag Tessera has.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from tessera.cli import cli


def refusal(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("server", "entry", "create", "-parentID", "spiffe://example.org/node"),
         "Error: No such option '-parentID'. Tessera spells it --parent-id."),
        (("server", "entry", "create", "--parent-id", "spiffe://example.org/node",
          "-spiffeID", "spiffe://example.org/web"),
         "Error: No such option '-spiffeID'. Tessera spells it --spiffe-id."),
        (("server", "entry", "show", "-selector", "unix:uid:0"),
         "Error: No such option '-selector'. Tessera spells it --selector."),
        (("server", "entry", "update", "-entryID", "x", "-x509SVIDTTL", "60"),
         "Error: No such option '-entryID'. Tessera spells it --entry-id."),
        (("server", "entry", "create", "-x509SVIDTTL=60"),
         "Error: No such option '-x509SVIDTTL'. Tessera spells it --x509-svid-ttl."),
        (("server", "entry", "create", "-federatesWith", "spiffe://partner.org"),
         "Error: No such option '-federatesWith'. Tessera spells it --federates-with."),
        # -hint starts with -h, which is help: click refuses the -i after it.
        (("server", "entry", "create", "-hint", "blue"),
         "Error: No such option '-hint'. Tessera spells it --hint."),
        (("server", "token", "generate", "-spiffeID", "spiffe://example.org/node"),
         "Error: No such option '-spiffeID'. Tessera spells it --spiffe-id."),
        (("agent", "api", "fetch", "x509", "-socketPath", "/tmp/agent.sock"),
         "Error: No such option '-socketPath'. Tessera spells flags in kebab-case "
         "(--socket-path), and this command has no such flag."),
    ],
)
def test_a_spire_flag_is_answered_with_the_tessera_spelling(
    args: tuple[str, ...], expected: str
) -> None:
    assert refusal(*args) == (2, expected)


def test_other_unknown_options_keep_clicks_message() -> None:
    assert refusal("server", "entry", "show", "--parentid", "x") == (
        2, "Error: No such option '--parentid'. (Did you mean one of: '--entry-id', '--parent-id'?)"
    )


def test_the_installed_command_says_it_too() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "server", "entry", "create", "-parentID", "x"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.endswith(
        "Error: No such option '-parentID'. Tessera spells it --parent-id.\n"
    )
