"""docs/getting-started.md, run as written: every ``sh`` block, in order.

The blocks run in a temporary checkout (the Makefile, a pyproject.toml no newer
than the installed virtualenv's stamp, and ``.venv`` pointing at this one), each
in a fresh ``bash`` that starts from the environment the previous blocks
exported, as one terminal would. An HTML comment right before a block (invisible
on the rendered page) says what a reader does besides typing it:

- ``<!-- test: background, ready when "TEXT" -->``: it runs in another
  terminal; go on once its output shows TEXT.
- ``<!-- test: stop background -->``: Ctrl-C in those other terminals.
- ``<!-- test: exits 1, prints "TEXT" -->``: its exit status and what it says.

Ports are the only thing the test changes: ``TESSERA_BIND``, ``TESSERA_SERVER``
and ``TESSERA_HEALTH_BIND`` point at free ones (the environment overrides the
config files' 8081 and 8088, which other processes on this machine may hold).
There is no ``sudo`` here and the test runs as root: a ``sudo -u USER`` shim
runs the command as USER with ``setpriv``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration
REPOSITORY = Path(__file__).resolve().parents[2]
PAGE = REPOSITORY / "docs" / "getting-started.md"
READY_DEADLINE = 60.0
ANNOTATION = re.compile(r"<!-- test: (.*) -->")
QUOTED = re.compile(r'"([^"]*)"')
SUDO = """#!/bin/sh
# sudo -u USER COMMAND...: what sudo would do, for a test that runs as root.
[ "$1" = "-u" ] || { echo "this shim takes only: sudo -u USER COMMAND..." >&2; exit 64; }
user=$2
shift 2
exec setpriv --reuid="$user" --regid="$(id -g "$user")" --clear-groups "$@"
"""


@dataclass
class Step:
    code: str = ""
    background: bool = False
    ready_when: str | None = None
    exits: int = 0
    prints: list[str] = field(default_factory=list)
    stop_background: bool = False
    line: int = 0


def page_steps(text: str) -> list[Step]:
    steps: list[Step] = []
    pending: Step | None = None
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if match := ANNOTATION.fullmatch(line.strip()):
            words = match.group(1)
            if words == "stop background":
                steps.append(Step(stop_background=True, line=index + 1))
            else:
                pending = Step(line=index + 1)
                pending.background = words.startswith("background")
                if (exits := re.search(r"exits (\d+)", words)) is not None:
                    pending.exits = int(exits.group(1))
                quoted = QUOTED.findall(words)
                if pending.background:
                    pending.ready_when = quoted[0]
                else:
                    pending.prints = quoted
        elif line.strip() == "```sh":
            end = lines.index("```", index + 1)
            step = pending or Step()
            step.code = "\n".join(lines[index + 1:end])
            step.line = index + 1
            steps.append(step)
            pending = None
            index = end
        index += 1
    return steps


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A directory laid out like a clone with `make up` done; every uid may enter it."""
    directory = Path(tempfile.mkdtemp(prefix="tessera-getting-started-"))
    os.chmod(directory, 0o755)
    venv = Path(sys.executable).parent.parent
    (directory / ".venv").symlink_to(venv)
    shutil.copy(REPOSITORY / "Makefile", directory / "Makefile")
    shutil.copy(REPOSITORY / "pyproject.toml", directory / "pyproject.toml")
    installed = (venv / ".installed").stat().st_mtime
    os.utime(directory / "pyproject.toml", (installed - 1, installed - 1))  # no reinstall
    shims = directory / ".shims"
    shims.mkdir()
    (shims / "sudo").write_text(SUDO)
    os.chmod(shims / "sudo", 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_every_command_of_getting_started_runs(checkout: Path) -> None:
    steps = page_steps(PAGE.read_text())
    assert sum(1 for s in steps if s.code) >= 10
    assert any(s.exits == 1 for s in steps), "the page shows a refused uid"
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("TESSERA_", "SPIFFE_", "VIRTUAL_ENV"))}
    node_api = f"127.0.0.1:{free_port()}"
    environment.update({
        "PATH": f"{checkout / '.shims'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "TESSERA_BIND": node_api,
        "TESSERA_SERVER": node_api,
        "TESSERA_HEALTH_BIND": f"127.0.0.1:{free_port()}",
    })
    state = checkout / ".exported"
    state.write_text("")
    background: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for number, step in enumerate(steps):
            where = f"{PAGE.name}:{step.line}"
            if step.stop_background:
                stop(background, signal.SIGINT)
                continue
            if step.background:
                log = checkout / f".background-{number}.log"
                with log.open("wb") as out:
                    process = subprocess.Popen(
                        ["bash", "-c", f". {state}\ncd {checkout}\n{step.code}"],
                        cwd=checkout, env=environment, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                background.append((process, log))
                assert step.ready_when is not None
                wait_for(process, log, step.ready_when, where)
                continue
            result = subprocess.run(
                ["bash", "-c",
                 f"set -eo pipefail\n. {state}\ncd {checkout}\n{step.code}\nexport -p > {state}"],
                cwd=checkout, env=environment, capture_output=True, text=True, timeout=120,
            )
            said = result.stdout + result.stderr
            assert result.returncode == step.exits, f"{where}\n{step.code}\n{said}"
            for text in step.prints:
                assert text in said, f"{where}\n{step.code}\n{said}"
    finally:
        stop(background, signal.SIGTERM)


def wait_for(process: subprocess.Popen[bytes], log: Path, text: str, where: str) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        output = log.read_text(errors="replace")
        if text in output:
            return
        assert process.poll() is None, f"{where} exited {process.returncode}:\n{output}"
        time.sleep(0.05)
    raise AssertionError(f"{where}: no {text!r} in {READY_DEADLINE}s:\n{log.read_text()}")


def stop(background: list[tuple[subprocess.Popen[bytes], Path]], sig: signal.Signals) -> None:
    while background:
        process, log = background.pop()
        if process.poll() is None:
            os.killpg(process.pid, sig)  # the whole terminal's job, as Ctrl-C does
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise AssertionError(f"did not stop on {sig.name}:\n{log.read_text()}") from None
