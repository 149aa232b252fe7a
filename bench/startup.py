"""Start-up: how soon a command answers and a process is ready, next to Python's own start.

Each command is started the way a user starts it, from the venv's ``tessera``
script, and timed from spawn to its answer (an admin command) or to the line
that says it is ready (``Server is ready``, ``... is up``). The reference is
``python -c pass`` from the same interpreter in the same run: what no Python
command can beat. Medians of several runs; wall time is the thing measured.

    python bench/run.py --only startup

Targets: an admin command within 0.12 s of Python's start; ``tessera server
run`` ready within 0.6 s (restarting on its data directory, the common case);
``tessera up`` within 1.0 s.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.deployment import TESSERA, TRUST_DOMAIN, free_port, running_server
from bench.report import Figure

NAME = "startup"
ADMIN_TARGET = 0.12
SERVER_TARGET = 0.6
UP_TARGET = 1.0
READY_DEADLINE = 60.0


@dataclass(frozen=True)
class Sizes:
    runs: int


FULL = Sizes(runs=7)
QUICK = Sizes(runs=1)


def _timed(args: Sequence[str]) -> float:
    began = time.monotonic()
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   timeout=READY_DEADLINE)
    return time.monotonic() - began


def _until_ready(args: Sequence[str], marker: str) -> float:
    """Seconds from spawn to the first output line holding ``marker``; then stopped."""
    began = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    seen: list[str] = []
    # A process that hangs without a word would block the read: kill it at the deadline,
    # which ends its output and so the loop.
    watchdog = threading.Timer(READY_DEADLINE, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if marker in line:
                return time.monotonic() - began
            seen.append(line)
        raise RuntimeError(f"{' '.join(args[:3])} never said {marker!r}:\n{''.join(seen[-30:])}")
    finally:
        watchdog.cancel()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def run(quick: bool) -> list[Figure]:
    sizes = QUICK if quick else FULL
    python = [_timed([sys.executable, "-c", "pass"]) for _ in range(sizes.runs)]
    bare = _median(python)
    reference = f"python -c pass {bare:.3f}s"
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-startup-") as tmp:
        root = Path(tmp)
        with running_server(root / "server") as server:
            show = [TESSERA, "server", "entry", "show", "--admin-socket",
                    str(server.admin_socket), "--output", "json"]
            admin = _median([_timed(show) for _ in range(sizes.runs)])
        beyond = admin - bare
        figures.append(Figure(NAME, "admin command (server entry show) beyond Python's start",
                              beyond, "s", ceiling=reference, target=f"<= {ADMIN_TARGET}s",
                              met=beyond <= ADMIN_TARGET,
                              data={"command": admin, "python": bare}))

        def server_run(data_dir: Path) -> list[str]:
            return [TESSERA, "server", "run", "--trust-domain", TRUST_DOMAIN, "--data-dir",
                    str(data_dir), "--bind", f"127.0.0.1:{free_port()}"]

        first: list[float] = []
        again: list[float] = []
        for n in range(sizes.runs):
            data_dir = root / f"run-{n}"
            first.append(_until_ready(server_run(data_dir), "Server is ready"))
            again.append(_until_ready(server_run(data_dir), "Server is ready"))
            shutil.rmtree(data_dir, ignore_errors=True)
        for label, samples in (("restart on its data dir", again), ("first start", first)):
            value = _median(samples)
            figures.append(Figure(NAME, f"server run ready, {label}", value, "s",
                                  ceiling=f"{reference} (x{value / bare:.0f})",
                                  target=f"<= {SERVER_TARGET}s" if samples is again else "",
                                  met=value <= SERVER_TARGET if samples is again else None,
                                  data={"python": bare}))

        up: list[float] = []
        for n in range(sizes.runs):
            data_dir = root / f"up-{n}"
            up.append(_until_ready([TESSERA, "up", "--trust-domain", TRUST_DOMAIN, "--data-dir",
                                    str(data_dir)], "is up ("))
            shutil.rmtree(data_dir, ignore_errors=True)
        value = _median(up)
        figures.append(Figure(NAME, "tessera up ready (new data dir)", value, "s",
                              ceiling=f"{reference} (x{value / bare:.0f})",
                              target=f"<= {UP_TARGET}s", met=value <= UP_TARGET,
                              data={"python": bare}))
    return figures
