"""Envoy's output, line by line into Tessera's log, and its last words kept for errors.

Envoy runs with ``--log-format`` :data:`LOG_FORMAT`, so each entry starts with its
level and logger (``warning|config|...``); :class:`EnvoyOutput` logs each line to the
``tessera.envoy`` logger at the matching level, after a prefix (``envoy: [config] ...``).
A line without that start continues the entry before it (Envoy's messages may span
lines; at exit it also prints the error that stopped it, bare), or is something else
Envoy was told to write to its standard output (an access log), logged at INFO. Once
:attr:`EnvoyOutput.stopping` is set, warnings are logged at INFO (a caught SIGTERM,
a closed xDS stream: stopping, not trouble)::

    output = EnvoyOutput(prefix="envoy")
    await output.follow(process.stdout)         # until Envoy closes it
    output.last_words()                         # "cannot bind '127.0.0.1:80': Permission denied"

Bounded: a line longer than ``max_line`` bytes is cut (and marked so); the last
``tail`` entries (of at most ``tail`` lines each) are kept, for
:meth:`EnvoyOutput.last_words`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = ["LOG_FORMAT", "EnvoyOutput"]

LOG_FORMAT: Final = "%l|%n|%v"
"""Envoy's ``--log-format``: level, logger, message (its own timestamps are Tessera's log's)."""
MAX_LINE_BYTES: Final = 8 * 1024
TAIL_LINES: Final = 40

_LEVELS: Final = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_ENTRY: Final = re.compile(r"(trace|debug|info|warning|error|critical)\|([\w.-]+)\|(.*)", re.DOTALL)
# How Envoy's main reports the exception that stops it at start: "error `WHY` initializing
# config 'PATH'" (WHY may span lines).
_INIT_ERROR: Final = re.compile(r"error `(.+?)` initializing config", re.DOTALL)
_log = logging.getLogger("tessera.envoy")


@dataclass
class _Entry:
    level: int
    logger: str
    lines: list[str]

    def text(self) -> str:
        return " ".join(" ".join(self.lines).split())


class EnvoyOutput:
    """One Envoy process's output (a new one for each run)."""

    def __init__(
        self,
        *,
        prefix: str = "envoy",
        logger: logging.Logger = _log,
        max_line: int = MAX_LINE_BYTES,
        tail: int = TAIL_LINES,
    ) -> None:
        self._prefix = prefix
        self._logger = logger
        self._max_line = max_line
        self._tail = tail
        self._entries: deque[_Entry] = deque(maxlen=tail)
        self.stopping = False
        """Set when Envoy is being stopped: its warnings then (the signal caught, the xDS
        stream closed) are what stopping looks like, logged at INFO."""

    async def follow(self, stream: asyncio.StreamReader) -> None:
        """Read ``stream`` to its end, a line at a time (its reader's ``limit`` should be at
        least ``max_line``)."""
        cut = False  # in the middle of a line too long: drop the rest of it
        while True:
            try:
                raw = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as err:
                raw = err.partial
                if not raw:
                    return
            except asyncio.LimitOverrunError as err:
                piece = await stream.read(max(err.consumed, 1))
                if not cut:
                    self.line(piece[: self._max_line].decode("utf-8", "replace") + " [cut]")
                cut = True
                continue
            if cut:
                cut = False
                continue
            if len(raw) > self._max_line:
                self.line(raw[: self._max_line].decode("utf-8", "replace") + " [cut]")
            else:
                self.line(raw.decode("utf-8", "replace").rstrip("\r\n"))

    def line(self, text: str) -> None:
        """Log one line of Envoy's output and keep it."""
        entry = _ENTRY.fullmatch(text)
        if entry:
            level, logger, message = entry.groups()
            current = _Entry(_LEVELS[level], logger, [message])
            self._entries.append(current)
        elif not text.strip():
            return
        elif text[:1].isspace() and self._entries:  # continues the message before it
            current = self._entries[-1]
            if len(current.lines) < self._tail:
                current.lines.append(text)
            message, logger = text.strip(), current.logger
        else:
            current = _Entry(logging.INFO, "", [text])
            self._entries.append(current)
            message, logger = text, ""
        where = f" [{logger}]" if logger else ""
        level = current.level
        if self.stopping and level == logging.WARNING:
            level = logging.INFO
        self._logger.log(level, "%s:%s %s", self._prefix, where, message)

    def last_words(self) -> str:
        """Why Envoy stopped, as well as its output tells: the error it reported last (only
        what it could not do, when that was at start), or "" when it reported none."""
        for entry in reversed(self._entries):
            if entry.level >= logging.ERROR:
                text = entry.text()
                at_start = _INIT_ERROR.search(text)
                return " ".join(at_start.group(1).split()) if at_start else text
        return ""
