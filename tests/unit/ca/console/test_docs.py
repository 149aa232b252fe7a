"""Every ``tessera server console`` command docs/console.md and docs/cli.md show parses with
the command's own flags (the integration tests run them)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ca.cli.console import server_console

DOCS = Path(__file__).resolve().parents[4] / "docs"


def documented() -> list[str]:
    found = []
    for line in (DOCS / "console.md").read_text().splitlines():
        if line.startswith("tessera server console"):
            found.append(line)
    table = (DOCS / "cli.md").read_text()
    found += [re.sub(r"\[|\]", "", m) for m in re.findall(r"`(tessera server console[^`]*)`",
                                                          table)]
    return found


@pytest.mark.parametrize("command", documented())
def test_the_documented_command_parses(command: str) -> None:
    args = shlex.split(command)[3:]
    context = server_console.make_context("console", args)
    assert context.params["bind"]


def test_every_flag_is_documented_on_the_console_page() -> None:
    page = (DOCS / "console.md").read_text()
    flags = {opt for param in server_console.params for opt in param.opts
             if opt.startswith("--") and opt not in ("--help",)}
    missing = {flag for flag in flags if flag not in page
               and flag not in ("--admin-socket", "--data-dir", "--output", "--config")}
    assert not missing
    assert len(documented()) >= 4
