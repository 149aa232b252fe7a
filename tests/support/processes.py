"""Long-running processes for tests: started with their output in files, waited on with a
deadline, shown on failure, stopped with SIGTERM and then, if need be, SIGKILL.

    with Process.start("server", [TESSERA, "server", "run", ...], log_path=tmp_path / "s.log",
                       ) as server:
        server.wait_until(lambda: healthy() or None, "the server answering /v1/health")
        server.wait_for("Tessera server is ready")
    # stopped here, however the block ended

Waiting is polling: a check runs every 50 ms until it answers or the deadline passes; nothing
sleeps for a fixed time hoping something happened meanwhile. A wait fails at once when the
process exits, and every failure carries the process's output.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

__all__ = ["POLL_INTERVAL", "STOP_GRACE", "Process", "ProcessExited", "poll"]

T = TypeVar("T")

POLL_INTERVAL = 0.05
"""Seconds between two checks of a condition."""
STOP_GRACE = 10.0
"""Seconds a process has to exit after SIGTERM before it is killed."""
DEFAULT_DEADLINE = 20.0


class ProcessExited(AssertionError):
    """A process a test waited on exited; the message holds its output."""


def poll(
    check: Callable[[], T | None],
    deadline: float,
    what: str,
    *,
    context: Callable[[], str] | None = None,
) -> T:
    """Call ``check`` until it returns something other than None and return that; fail after
    ``deadline`` seconds, saying ``what`` did not happen (and ``context()``, if given).

    An exception from ``check`` means "not yet" (the last one is in the failure), a failed
    assertion included; only ``ProcessExited`` fails at once.
    """
    end = time.monotonic() + deadline
    last_error: Exception | None = None
    while True:
        try:
            value = check()
        except ProcessExited:
            raise
        except Exception as err:  # not there yet
            last_error = err
            value = None
        if value is not None:
            return value
        if time.monotonic() >= end:
            break
        time.sleep(POLL_INTERVAL)
    message = f"{what} did not happen within {deadline}s (last error: {last_error})"
    raise AssertionError(f"{message}\n{context()}" if context else message)


class Process:
    """One run of a command (``Process.start``), its output in files.

    stdout and stderr go to ``log_path`` (appended to, so a restarted process keeps its
    earlier runs' output), or stdout to ``stdout_path`` when given. ``pid``, ``poll``,
    ``wait``, ``send_signal`` and ``returncode`` are the ``subprocess.Popen`` ones.
    """

    def __init__(
        self,
        name: str,
        popen: subprocess.Popen[bytes],
        *,
        log_path: Path,
        stdout_path: Path | None = None,
    ) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self.stdout_path = stdout_path

    @classmethod
    def start(
        cls,
        name: str,
        args: Sequence[str],
        *,
        log_path: Path,
        stdout_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Process:
        """Start ``args`` (``env``, when given, is its whole environment); ``name`` names it in
        failures."""
        with log_path.open("ab") as log:
            if stdout_path is None:
                popen = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=cwd)  # fmt: skip
            else:
                with stdout_path.open("ab") as out:
                    popen = subprocess.Popen(list(args), stdout=out, stderr=log, env=env,
                                             cwd=cwd)  # fmt: skip
        return cls(name, popen, log_path=log_path, stdout_path=stdout_path)

    # -- the Popen vocabulary --

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    # -- output --

    def log(self) -> str:
        """What the process wrote to ``log_path`` (its stderr, and its stdout unless apart)."""
        return _read(self.log_path)

    def stdout(self) -> str:
        """Its stdout, when kept apart in ``stdout_path``."""
        return _read(self.stdout_path) if self.stdout_path else ""

    def output(self) -> str:
        """Everything it wrote, labelled, for failure messages."""
        text = f"--- {self.name} log ({self.log_path}) ---\n{self.log()}"
        if self.stdout_path is not None:
            text += f"\n--- {self.name} stdout ({self.stdout_path}) ---\n{self.stdout()}"
        return text

    # -- waiting --

    def check_running(self) -> None:
        """Fail, showing the output, if the process has exited."""
        if self.popen.poll() is not None:
            raise ProcessExited(f"{self.name} exited {self.popen.returncode}:\n{self.output()}")

    def wait_until(
        self, check: Callable[[], T | None], what: str, deadline: float = DEFAULT_DEADLINE
    ) -> T:
        """``poll(check, ...)`` that fails at once if the process exits, and shows its output
        if the deadline passes."""

        def while_running() -> T | None:
            self.check_running()
            return check()

        return poll(while_running, deadline, f"{self.name}: {what}", context=self.output)

    def wait_for(
        self, text: str, deadline: float = DEFAULT_DEADLINE, *, in_stdout: bool = False
    ) -> None:
        """Wait until ``text`` appears in the log (or in stdout, if ``in_stdout``)."""
        read = self.stdout if in_stdout else self.log
        self.wait_until(lambda: True if text in read() else None, f"{text!r} in its output",
                        deadline)  # fmt: skip

    # -- stopping --

    def stop(self, sig: int = signal.SIGTERM, grace: float = STOP_GRACE) -> int:
        """Send ``sig`` (if it still runs), give it ``grace`` seconds, then SIGKILL; its exit
        status."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                return self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()

    def __enter__(self) -> Process:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
