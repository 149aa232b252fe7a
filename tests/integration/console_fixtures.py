"""``tessera server console`` processes, started from the CLI as a user would.

    from tests.integration.console_fixtures import start_console_fixture  # registers it
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import TESSERA, ServerProcess
from tests.support.processes import Process


@dataclass
class ConsoleProcess:
    process: Process
    url: str
    """What the command printed: with the one-time token, unless --mtls."""
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def signed_in(self) -> Iterator[httpx.Client]:
        """A client that spent the token and holds the session cookie."""
        with httpx.Client(base_url=self.base, timeout=10) as client:
            answer = client.get(self.url)
            assert answer.status_code == 303, answer.text
            assert "tessera_console" in client.cookies
            yield client


@pytest.fixture(name="start_console")
def start_console_fixture(tmp_path: Path) -> Iterator[object]:
    """Start consoles for a server (``start(server, *flags)``); all stop after the test."""
    started: list[Process] = []

    def start(server: ServerProcess, *flags: str) -> ConsoleProcess:
        name = f"console-{len(started)}"
        process = Process.start(
            name,
            [TESSERA, "server", "console", "--data-dir", str(server.data_dir),
             "--bind", "127.0.0.1:0", "--output", "json", *flags],
            log_path=tmp_path / f"{name}.log", stdout_path=tmp_path / f"{name}.out",
        )
        started.append(process)
        printed = process.wait_until(lambda: _printed(process), "printing its URL")
        return ConsoleProcess(process, printed["url"], printed["port"])

    yield start
    for process in started:
        process.stop()


def _printed(process: Process) -> dict[str, object] | None:
    line = process.stdout().strip()
    return json.loads(line) if line.endswith("}") else None
