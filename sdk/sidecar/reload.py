"""Telling a program that its SVID files changed: run a command, or signal a pid.

::

    reload = command_reload("nginx -s reload")               # split like a shell, run without one
    reload = signal_reload("SIGHUP", Path("/run/nginx.pid")) # the pid is read at every reload
    ok = await reload()                                      # False (and logged) when it failed

A failed reload never stops the sidecar: the command's exit status and the
end of its output, or why the signal could not be sent, are logged at
WARNING and the next rotation tries again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from sdk.sidecar.errors import SidecarConfigError

__all__ = ["Reload", "command_reload", "parse_signal", "signal_reload"]

_log = logging.getLogger("tessera.sidecar")

Reload = Callable[[], Awaitable[bool]]
"""Tells the program; True when that worked."""

COMMAND_TIMEOUT_SECONDS: Final = 30.0
_OUTPUT_TAIL: Final = 500


def command_reload(command: str, *, timeout: float = COMMAND_TIMEOUT_SECONDS) -> Reload:
    """Run ``command`` (split like a shell would, but run without one) after every write."""
    try:
        argv = shlex.split(command)
    except ValueError as err:
        raise SidecarConfigError(f"--cmd {command!r} cannot be split into words: {err}") from err
    if not argv:
        raise SidecarConfigError("--cmd is empty; give the command to run, e.g. 'nginx -s reload'")

    async def run() -> bool:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as err:
            _log.warning("cannot run %r: %s", command, err.strerror or err)
            return False
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            _log.warning("%r did not finish within %gs; killed it", command, timeout)
            return False
        if process.returncode != 0:
            tail = output.decode(errors="replace").strip()[-_OUTPUT_TAIL:]
            _log.warning("%r exited %d: %s", command, process.returncode, tail or "(no output)")
            return False
        _log.info("ran %r", command)
        return True

    return run


def signal_reload(signal_name: str, pid_file: Path) -> Reload:
    """Send ``signal_name`` to the pid written in ``pid_file`` after every write."""
    signum = parse_signal(signal_name)

    async def send() -> bool:
        try:
            text = pid_file.read_text().strip()
        except OSError as err:
            _log.warning("cannot read the pid file %s: %s; no %s sent", pid_file,
                         err.strerror or err, signum.name)  # fmt: skip
            return False
        if not text.isdigit() or int(text) <= 0:
            _log.warning("the pid file %s holds %r, not a pid; no %s sent", pid_file,
                         text[:40], signum.name)  # fmt: skip
            return False
        pid = int(text)
        try:
            os.kill(pid, signum)
        except OSError as err:
            _log.warning("cannot send %s to pid %d (from %s): %s", signum.name, pid, pid_file,
                         err.strerror or err)  # fmt: skip
            return False
        _log.info("sent %s to pid %d", signum.name, pid)
        return True

    return send


def parse_signal(name: str) -> signal.Signals:
    """``SIGHUP``, ``HUP`` or ``1`` -> ``signal.SIGHUP``."""
    text = name.strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text))
        except ValueError:
            pass
    else:
        candidate = text if text.startswith("SIG") else f"SIG{text}"
        if candidate in signal.Signals.__members__:
            return signal.Signals[candidate]
    raise SidecarConfigError(
        f"--signal {name!r} is not a signal; give a name such as SIGHUP, SIGUSR1 or SIGTERM"
    )
