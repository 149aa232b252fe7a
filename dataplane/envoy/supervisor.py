"""Running one Envoy for a proxy: start it, restart it when it dies, drain it on stop.

    supervisor = EnvoySupervisor(bootstrap, work_dir=Path("/run/tessera/sidecar/envoy"))
    await supervisor.start()       # EnvoyMissing, EnvoyRefused (with Envoy's reason)
    supervisor.ready_problem()     # None, or why it would not carry traffic now
    await supervisor.admin.config_dump()
    body = generate_latest(registry) + await supervisor.prometheus_stats()
    await supervisor.stop(grace=10)

:meth:`~EnvoySupervisor.start` writes the bootstrap (JSON, mode 0600, written whole)
into the work directory (made private, 0700), starts ``envoy -c bootstrap.json`` and
returns once Envoy's admin interface answers; when Envoy exits before that (a bootstrap
it refuses, a port it cannot bind), :class:`~dataplane.envoy.errors.EnvoyRefused` carries
what Envoy said. The supervisor chooses the admin address: a Unix socket in the work
directory (``admin.sock``, 0600: other users of the host can neither read Envoy's
configuration nor stop it), or, with ``admin_port``, that port on 127.0.0.1 (0: a free
one, learned from ``--admin-address-path``).

Envoy runs with hot restart disabled (so any number of them run side by side, with no
shared memory or base ID to tell apart), in a session of its own (a Ctrl-C reaches the
supervisor, which drains it), its output passed line by line to the ``tessera.envoy``
log (:mod:`dataplane.envoy.output`). When it exits on its own it is started again after
a capped backoff, each restart counted (``restarts``, ``tessera_envoy_restarts_total``);
after ``max_quick_failures`` runs in a row that each ended within
``stable_after_seconds`` of starting, the supervisor stops trying: ``ready_problem()``
and :meth:`~EnvoySupervisor.wait_failure` say why, in Envoy's words. An Envoy left
running by an earlier supervisor of the same work directory that died (its pid is kept
in ``envoy.pid``) is stopped before a new one starts. A supervisor holds its work
directory locked (``supervisor.lock``) while it runs: a second one for the same directory
is refused with an EnvoyError naming the first one's pid, and leaves its Envoy alone.
With ``keep_work_dir=False`` the directory is removed once Envoy has stopped. Envoy is
sent SIGTERM when the supervisor's process dies, however it dies (``setpriv
--pdeathsig``, from util-linux, when installed; ``die_with_supervisor=False`` leaves it
running), so a killed sidecar leaves no Envoy behind. ``before_start`` runs once a
leftover is stopped and before Envoy starts: the checks of what Envoy will need.

:meth:`~EnvoySupervisor.stop` drains: ``POST /drain_listeners?graceful`` asks every
caller to close its connection, the listeners keep accepting for ``drain_seconds`` and
then stop; the supervisor waits until no connection is open on a listener (at most
``grace`` seconds), then sends SIGTERM, and SIGKILL after ``kill_after_seconds``.

Readiness is followed in the background (every ``readiness_interval_seconds``, and at
once on every change), so :meth:`~EnvoySupervisor.ready_problem` answers without waiting:
Envoy is ready when ``/ready`` says LIVE, every listener named in ``listeners`` (by
default, the bootstrap's static ones) is active, and, with listeners from the agent
(LDS), Envoy has received them and none is still warming. ``on_readiness`` is called
after each change of what :meth:`~EnvoySupervisor.ready_problem` says or of the active
:attr:`~EnvoySupervisor.listeners`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Final

from dataplane.envoy.admin import EnvoyAdmin
from dataplane.envoy.binary import find_envoy
from dataplane.envoy.errors import EnvoyAdminError, EnvoyError, EnvoyRefused
from dataplane.envoy.metrics import EnvoyMetrics
from dataplane.envoy.output import LOG_FORMAT, MAX_LINE_BYTES, EnvoyOutput
from sdk.address import HostPort
from sdk.backoff import Backoff
from sdk.errors import ConfigError
from sdk.privatefiles import os_error_sentence, prepare_private_dir, write_file_atomically

__all__ = ["LOG_LEVELS", "EnvoySupervisor"]

LOG_LEVELS: Final = ("trace", "debug", "info", "warning", "error", "critical", "off")
BOOTSTRAP_FILE: Final = "bootstrap.json"
ADMIN_SOCKET: Final = "admin.sock"
ADMIN_ADDRESS_FILE: Final = "admin-address"
PID_FILE: Final = "envoy.pid"
LOCK_FILE: Final = "supervisor.lock"
LOCK_ATTEMPTS: Final = 3
"""Locked (flock) by the supervisor using the work directory, holding its pid."""
FLUSH_MILLISECONDS: Final = 1000
"""How often Envoy writes out its access log (its own default, 10 s, hides a request's line
from whoever follows the log)."""
POLL_SECONDS: Final = 0.05
"""How often starting and draining look at Envoy again."""
PROMETHEUS_TIMEOUT_SECONDS: Final = 2.0
PROMETHEUS_MAX_BYTES: Final = 8 * 1024 * 1024
# sun_path holds 108 bytes on Linux, its terminating NUL included.
_MAX_SOCKET_PATH: Final = 107

_log = logging.getLogger("tessera.envoy")

Sleep = Callable[[float], Awaitable[None]]


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class EnvoySupervisor:
    """One Envoy, from :meth:`start` to :meth:`stop` (each called once)."""

    def __init__(
        self,
        bootstrap: Mapping[str, Any],
        *,
        work_dir: Path,
        admin_port: int | None = None,
        listeners: Collection[str] | None = None,
        log_level: str = "warning",
        concurrency: int | None = None,
        drain_seconds: int = 5,
        kill_after_seconds: float = 5.0,
        start_timeout_seconds: float = 15.0,
        readiness_interval_seconds: float = 0.5,
        restart_backoff: Backoff | None = None,
        max_quick_failures: int = 5,
        stable_after_seconds: float = 10.0,
        admin_timeout_seconds: float = 2.0,
        envoy: Path | None = None,
        metrics: EnvoyMetrics | None = None,
        log_prefix: str = "envoy",
        sleep: Sleep = asyncio.sleep,
        on_readiness: Callable[[], None] | None = None,
        keep_work_dir: bool = True,
        before_start: Callable[[], None] | None = None,
        die_with_supervisor: bool = True,
    ) -> None:
        if log_level not in LOG_LEVELS:
            raise ConfigError(
                f"Envoy's log level {log_level!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        if admin_port is not None and not 0 <= admin_port <= 65535:
            raise ConfigError(f"Envoy's admin port {admin_port} is not 0 to 65535")
        if max_quick_failures < 1:
            raise ValueError(f"max_quick_failures must be 1 or more, not {max_quick_failures}")
        self.work_dir = Path(work_dir)
        self.bootstrap_path = self.work_dir / BOOTSTRAP_FILE
        self._admin_socket = self.work_dir / ADMIN_SOCKET
        if admin_port is None and len(os.fsencode(self._admin_socket)) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"Envoy's work directory {self.work_dir} is too long a path for its admin "
                f"socket (a Unix socket's path has at most {_MAX_SOCKET_PATH} bytes): choose "
                "a shorter one, or give the admin interface a loopback port"
            )
        self._bootstrap = _with_admin(bootstrap, self._admin_socket, admin_port)
        self._admin_port = admin_port
        self._uses_lds = _uses_lds(self._bootstrap)
        self._listeners = (
            tuple(listeners) if listeners is not None else _static_listeners(self._bootstrap)
        )
        self._log_level = log_level
        self._concurrency = concurrency
        self._drain_seconds = drain_seconds
        self._kill_after = kill_after_seconds
        self._start_timeout = start_timeout_seconds
        self._readiness_interval = readiness_interval_seconds
        self._backoff = restart_backoff or Backoff(initial=0.25, maximum=10.0, jitter=0.2)
        self._max_quick_failures = max_quick_failures
        self._stable_after = stable_after_seconds
        self._admin_timeout = admin_timeout_seconds
        self._envoy = envoy
        self.metrics = metrics if metrics is not None else EnvoyMetrics()
        self._prefix = log_prefix
        self._sleep = sleep

        self._state = _State.NEW
        self._generation = 0  # grows on each change of state: a readiness check older is stale
        self._problem: str | None = "Envoy has not started yet"
        self._failure: str | None = None
        self._failed = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._wake = asyncio.Event()
        self._process: asyncio.subprocess.Process | None = None
        self._admin: EnvoyAdmin | None = None
        self._output_task: asyncio.Task[None] | None = None
        self._output: EnvoyOutput | None = None
        self._lock_descriptor: int | None = None
        self._keep_work_dir = keep_work_dir
        self._before_start = before_start
        self._setpriv = shutil.which("setpriv") if die_with_supervisor else None
        self._supervise_task: asyncio.Task[None] | None = None
        self._readiness_task: asyncio.Task[None] | None = None
        self.restarts = 0
        """Times Envoy was started again after it exited on its own."""
        self.listeners: Mapping[str, str] = {}
        self._polled_listeners: Mapping[str, str] | None = None
        """Envoy's active listeners, name -> address, as of the last readiness check."""
        self._on_readiness = on_readiness
        self.metrics.up.set(0)

    # -- what callers read --------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The running Envoy's process ID, or None."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def admin(self) -> EnvoyAdmin:
        """The running Envoy's admin interface; EnvoyError when it is not running."""
        if self._admin is None or self.pid is None:
            raise EnvoyError(f"Envoy is not running ({self._problem or self._state.value})")
        return self._admin

    @property
    def failure(self) -> str | None:
        """Why the supervisor gave up on Envoy, or None while it has not."""
        return self._failure

    def ready_problem(self) -> str | None:
        """Why Envoy would not carry traffic now (one sentence), or None: as of the last
        check, at most ``readiness_interval_seconds`` old."""
        return self._problem

    async def check_ready(self) -> str | None:
        """Ask Envoy now; what :meth:`ready_problem` says from then on."""
        generation = self._generation
        before = (self._problem, self.listeners)
        self._polled_listeners = None
        problem = await self._readiness()
        if generation == self._generation:  # else Envoy restarted or stopped meanwhile
            self._problem = problem
            if self._polled_listeners is not None:
                self.listeners = self._polled_listeners
        if (self._problem, self.listeners) != before:
            self._notify()
        return self._problem

    async def wait_failure(self) -> str:
        """Return once the supervisor has given up restarting Envoy, with why."""
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    async def prometheus_stats(
        self,
        *,
        used_only: bool = False,
        timeout: float = PROMETHEUS_TIMEOUT_SECONDS,
        max_bytes: int = PROMETHEUS_MAX_BYTES,
    ) -> bytes:
        """Envoy's stats in the Prometheus text format, to serve after the process's own
        metrics; b"" when Envoy is not running or does not answer within ``timeout``
        (``tessera_envoy_up`` says which) or answers more than ``max_bytes``."""
        admin = self._admin
        if admin is None or self.pid is None:
            return b""
        try:
            text = await admin.bounded(timeout=timeout, max_bytes=max_bytes).prometheus_stats(
                used_only=used_only
            )
        except EnvoyAdminError as err:
            _log.debug("%s: no stats for /metrics: %s", self._prefix, err)
            return b""
        return text if not text or text.endswith(b"\n") else text + b"\n"

    # -- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Write the bootstrap, start Envoy and return once its admin interface answers.

        EnvoyMissing when there is no envoy binary; ConfigError when the work directory
        cannot be made private or written; EnvoyRefused when Envoy exits before it serves
        (or does not answer within ``start_timeout_seconds``), with Envoy's reason.
        """
        if self._state is not _State.NEW:
            raise RuntimeError("an EnvoySupervisor starts once")
        binary = self._envoy or find_envoy()
        prepare_private_dir(self.work_dir, what="Envoy work directory")
        self._lock()
        try:
            try:
                write_file_atomically(
                    self.bootstrap_path, json.dumps(self._bootstrap, indent=1).encode(),
                    mode=0o600,
                )  # fmt: skip
            except OSError as err:
                doing = f"write Envoy's bootstrap {self.bootstrap_path}"
                raise ConfigError(os_error_sentence(err, doing, flag="work directory")) from err
            await self._stop_leftover()
            if self._before_start is not None:
                self._before_start()  # e.g. the ports checked, once a leftover let them go
        except BaseException:  # nothing started: leave the directory as stop() would
            self._release_work_dir()
            raise
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._set_state(_State.STARTING, "Envoy is starting")
        self._supervise_task = asyncio.create_task(self._supervise(binary, first))
        self._readiness_task = asyncio.create_task(self._follow_readiness())
        try:
            await first
        except BaseException:  # refused, or start() itself cancelled: leave nothing running
            await self.stop(grace=0)
            raise

    def _command(self, binary: Path) -> list[str]:
        command = [
            str(binary), "-c", str(self.bootstrap_path),
            "--disable-hot-restart",
            "--log-level", self._log_level,
            "--log-format", LOG_FORMAT,
            "--drain-time-s", str(self._drain_seconds),
            "--drain-strategy", "immediate",
            "--file-flush-interval-msec", str(FLUSH_MILLISECONDS),
        ]  # fmt: skip
        if self._admin_port is not None:
            command += ["--admin-address-path", str(self.work_dir / ADMIN_ADDRESS_FILE)]
        if self._concurrency is not None:
            command += ["--concurrency", str(self._concurrency)]
        if self._setpriv is not None:  # Envoy is sent SIGTERM if this process dies
            command = [self._setpriv, "--pdeathsig", "TERM", "--", *command]
        return command

    async def _spawn(self, binary: Path) -> tuple[asyncio.subprocess.Process, EnvoyOutput]:
        self._admin_socket.unlink(missing_ok=True)
        (self.work_dir / ADMIN_ADDRESS_FILE).unlink(missing_ok=True)
        process = await asyncio.create_subprocess_exec(
            *self._command(binary),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            limit=MAX_LINE_BYTES,
        )
        self._process = process
        output = EnvoyOutput(prefix=self._prefix)
        self._output = output
        assert process.stdout is not None
        self._output_task = asyncio.create_task(output.follow(process.stdout))
        with contextlib.suppress(OSError):  # only to stop it if this supervisor dies
            write_file_atomically(self.work_dir / PID_FILE, f"{process.pid}\n".encode())
        return process, output

    def _lock(self) -> None:
        """Hold the work directory for this supervisor's life: EnvoyError naming the
        process that holds it already (its Envoy is not a leftover to stop)."""
        path = self.work_dir / LOCK_FILE
        for _ in range(LOCK_ATTEMPTS):
            try:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as err:
                sentence = os_error_sentence(err, f"open {path}", flag="work directory")
                raise ConfigError(sentence) from err
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
                os.close(descriptor)
                raise EnvoyError(
                    f"another Tessera process (pid {holder}) runs its Envoy from "
                    f"{self.work_dir}: stop it first, or start this one with other settings"
                ) from None
            if _same_file(descriptor, path):
                break
            os.close(descriptor)  # locked a file its stopping holder has just removed
        else:
            raise EnvoyError(f"could not lock {path}: it keeps being removed; try again")
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._lock_descriptor = descriptor

    def _release_work_dir(self) -> None:
        """Unlock the work directory; first, with keep_work_dir=False, remove it: the lock
        file last, so that no other supervisor can lock a file about to go."""
        if self._lock_descriptor is not None and not self._keep_work_dir and self.pid is None:
            for entry in self.work_dir.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            (self.work_dir / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.work_dir.rmdir()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_descriptor is not None:
            os.close(self._lock_descriptor)  # releases the lock
            self._lock_descriptor = None

    async def _stop_leftover(self) -> None:
        """Stop the Envoy an earlier supervisor of this work directory left running (it
        held the directory's lock, so it is gone: its Envoy outlived it)."""
        pid_file = self.work_dir / PID_FILE
        try:
            pid = int(pid_file.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if os.fsencode(self.bootstrap_path) not in command or not command[0].endswith(b"envoy"):
            return  # that pid is another process now
        _log.warning("%s: stopping the Envoy (pid %d) an earlier run left in %s",
                     self._prefix, pid, self.work_dir)  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + self._kill_after
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                await asyncio.sleep(POLL_SECONDS)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)

    # -- supervision ---------------------------------------------------------------------

    async def _supervise(self, binary: Path, first: asyncio.Future[None]) -> None:
        """Run Envoy again each time it exits, until stop() or too many quick failures."""
        quick_failures = 0
        try:
            while True:
                began = time.monotonic()
                ended = await self._run_once(binary, first)
                if ended is None:  # stopped
                    if not first.done():
                        first.set_exception(EnvoyError("Envoy was stopped before it served"))
                    return
                event, said = ended
                why = f": {said}" if said else ""
                if not first.done():
                    self._fail(f"Envoy {event}{why}", first, reason=said,
                               exit_code=self._exit_code())  # fmt: skip
                    return
                if time.monotonic() - began < self._stable_after:
                    quick_failures += 1
                else:  # it ran a while: this exit starts no crash loop
                    quick_failures = 0
                    self._backoff.reset()
                if quick_failures >= self._max_quick_failures:
                    self._fail(
                        f"Envoy failed {quick_failures} times in a row within "
                        f"{self._stable_after:g} s of starting; the last time it {event}{why}; "
                        "Tessera stopped restarting it",
                        first,
                        reason=said,
                        exit_code=self._exit_code(),
                    )
                    return
                delay = self._backoff.next()
                self._set_state(_State.RESTARTING, f"Envoy {event} and is restarting")
                _log.warning("%s: Envoy %s%s; starting it again in %.2g s",
                             self._prefix, event, why, delay)  # fmt: skip
                if await self._stopped_during(self._sleep(delay)):
                    return
                self.restarts += 1
                self.metrics.restarts.inc()
                self._set_state(_State.STARTING, f"Envoy is starting again: it {event}")
        except Exception as err:  # a fault of the supervisor's own: say so, never hang
            _log.exception("%s: supervising Envoy failed", self._prefix)
            self._fail(f"supervising Envoy failed: {err!r}", first, reason=repr(err),
                       exit_code=None)  # fmt: skip

    async def _run_once(self, binary: Path, first: asyncio.Future[None]) -> tuple[str, str] | None:
        """One run of Envoy, to its end: what happened ("exited (code 1)") and what Envoy
        said last; None when stop() ended it."""
        try:
            process, output = await self._spawn(binary)
        except OSError as err:
            return f"could not be started ({binary}: {err.strerror or err})", ""
        _log.info("%s: Envoy started (pid %d)", self._prefix, process.pid)
        exited = asyncio.create_task(process.wait())
        try:
            served = await self._wait_for_admin(exited)
        except TimeoutError:
            await self._terminate(process, exited)
            return (f"did not answer on its admin interface within {self._start_timeout:g} s "
                    f"of starting", output.last_words())  # fmt: skip
        if served:
            self._set_state(_State.RUNNING, "Envoy is starting")
            self.metrics.up.set(1)
            if not first.done():
                first.set_result(None)
            await self._stopped_during(asyncio.shield(exited))
            await exited  # when stop() came, it drains Envoy and ends it
        elif not exited.done():  # stop() came while it started
            await self._terminate(process, exited)
        if self._output_task is not None:
            await self._output_task
        self.metrics.up.set(0)
        self._admin = None
        if self._stop_requested.is_set():
            return None
        before = "" if served else " before it served"
        return f"exited ({_exit(process.returncode)}){before}", output.last_words()

    def _exit_code(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    async def _wait_for_admin(self, exited: asyncio.Task[int]) -> bool:
        """True once Envoy's admin answers; False if Envoy exits or stop() is called first;
        TimeoutError after ``start_timeout_seconds``."""
        deadline = time.monotonic() + self._start_timeout
        while not exited.done() and not self._stop_requested.is_set():
            admin = self._admin_of_run()
            if admin is not None:
                try:
                    await admin.server_state()
                except EnvoyAdminError:
                    pass
                else:
                    self._admin = admin
                    return True
            if time.monotonic() >= deadline:
                raise TimeoutError
            await asyncio.wait([exited], timeout=POLL_SECONDS)
        return False

    def _admin_of_run(self) -> EnvoyAdmin | None:
        if self._admin_port is None:
            if not self._admin_socket.exists():
                return None
            return EnvoyAdmin.unix(self._admin_socket, timeout=self._admin_timeout)
        try:
            text = (self.work_dir / ADMIN_ADDRESS_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        if not text:
            return None  # being written
        address = HostPort.parse(text, what="Envoy's admin address")
        return EnvoyAdmin.tcp(address, timeout=self._admin_timeout)

    async def _stopped_during(self, waiting: Awaitable[object]) -> bool:
        """Wait for ``waiting`` unless stop() comes first; True if it did."""
        waited = asyncio.ensure_future(waiting)
        stopped = asyncio.ensure_future(self._stop_requested.wait())
        await asyncio.wait([waited, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in (waited, stopped):
            task.cancel()
        return self._stop_requested.is_set()

    def _fail(
        self, message: str, first: asyncio.Future[None], *, reason: str, exit_code: int | None
    ) -> None:
        self._failure = message
        self._set_state(_State.FAILED, message)
        self.metrics.up.set(0)
        self._failed.set()
        _log.error("%s: %s", self._prefix, message)
        if not first.done():
            first.set_exception(EnvoyRefused(message, reason=reason, exit_code=exit_code))

    def _set_state(self, state: _State, problem: str) -> None:
        self._state = state
        self._generation += 1
        self._problem = problem
        if state is not _State.RUNNING:
            self.listeners = {}
        self._wake.set()
        self._notify()

    def _notify(self) -> None:
        """Call ``on_readiness``; a fault of its own is logged, never the supervisor's."""
        if self._on_readiness is None:
            return
        try:
            self._on_readiness()
        except Exception:
            _log.exception("%s: on_readiness failed", self._prefix)

    # -- readiness -----------------------------------------------------------------------

    async def _follow_readiness(self) -> None:
        while True:
            self._wake.clear()
            await self.check_ready()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._readiness_interval):
                    await self._wake.wait()

    async def _readiness(self) -> str | None:
        """What ready_problem() should say; the active listeners, when Envoy was asked for
        them, in ``_polled_listeners``."""
        if self._state is not _State.RUNNING or self._admin is None:
            return self._problem
        admin = self._admin
        try:
            state = await admin.server_state()
            warming = 0
            if self._uses_lds:
                stats = await admin.stats(
                    r"^listener_manager\.(lds\.update_(success|rejected)|total_listeners_warming)$"
                )
                if not stats.get("listener_manager.lds.update_success"):
                    if stats.get("listener_manager.lds.update_rejected"):
                        return ("Envoy refused the listeners the agent sent it (the agent logs "
                                "Envoy's reason)")  # fmt: skip
                    return "Envoy has not received its listeners from the agent yet"
                warming = int(stats.get("listener_manager.total_listeners_warming", 0))
            if state != "LIVE":
                return (
                    f"Envoy is {state.lower().replace('_', '-')}, not live yet: it waits for "
                    "the rest of its first configuration (clusters, certificates)"
                )
            active = await admin.listeners()
        except EnvoyAdminError as err:
            return f"Envoy does not answer on its admin interface: {err}"
        self._polled_listeners = active
        missing = [name for name in self._listeners if name not in active]
        if missing:
            names = ", ".join(missing)
            return (f"Envoy's listener {names} is not active yet" if len(missing) == 1
                    else f"Envoy's listeners {names} are not active yet")  # fmt: skip
        if warming:
            return (f"{warming} of Envoy's listeners {'is' if warming == 1 else 'are'} still "
                    "warming: waiting for their certificates or clusters")  # fmt: skip
        return None

    # -- stop ----------------------------------------------------------------------------

    async def stop(self, grace: float = 10.0) -> None:
        """Drain Envoy and stop it: callers are asked to close their connections, the
        listeners stop accepting after ``drain_seconds``; once no connection is open (at
        most ``grace`` seconds), SIGTERM, and SIGKILL ``kill_after_seconds`` later.
        Stopping a supervisor that is not running does nothing."""
        if self._state is _State.NEW:
            self._unlock()
            self._set_state(_State.STOPPED, "Envoy has stopped")
            self._stopped.set()
        if self._state in (_State.STOPPED, _State.STOPPING):
            await self._stopped.wait()
            return
        try:
            await self._stop(grace)
        finally:
            self._release_work_dir()
            self._stopped.set()

    async def _stop(self, grace: float) -> None:
        was = self._state
        self._set_state(_State.STOPPING, "Envoy is draining: Tessera is stopping it")
        self._stop_requested.set()
        process, admin = self._process, self._admin
        if self._output is not None:
            self._output.stopping = True
        if process is not None and process.returncode is None:
            exited = asyncio.ensure_future(process.wait())
            if was is _State.RUNNING and admin is not None:
                try:
                    await admin.drain_listeners(graceful=True)
                except EnvoyAdminError as err:
                    _log.warning("%s: could not drain Envoy: %s", self._prefix, err)
                else:
                    _log.info("%s: draining Envoy's listeners (%d s), then stopping it",
                              self._prefix, self._drain_seconds)  # fmt: skip
                    await self._wait_connections_closed(admin, exited, grace)
            await self._terminate(process, exited)
        await self._finish_tasks()
        self.metrics.up.set(0)
        (self.work_dir / PID_FILE).unlink(missing_ok=True)
        self._set_state(_State.STOPPED, self._failure or "Envoy has stopped")

    async def _wait_connections_closed(
        self, admin: EnvoyAdmin, exited: asyncio.Future[int], grace: float
    ) -> None:
        deadline = time.monotonic() + grace
        while not exited.done() and time.monotonic() < deadline:
            try:
                stats = await admin.stats(r"^listener\..*\.downstream_cx_active$")
            except EnvoyAdminError as err:
                _log.info("%s: cannot count Envoy's connections (%s); stopping it",
                          self._prefix, err)  # fmt: skip
                return
            if not _open_connections(stats):
                return
            await asyncio.wait([exited], timeout=POLL_SECONDS)
        if not exited.done():
            _log.info("%s: connections still open after %g s; stopping Envoy",
                      self._prefix, grace)  # fmt: skip

    async def _terminate(
        self, process: asyncio.subprocess.Process, exited: asyncio.Future[int]
    ) -> None:
        for sig, wait in ((signal.SIGTERM, self._kill_after), (signal.SIGKILL, None)):
            if exited.done():
                return
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), wait)

    async def _finish_tasks(self) -> None:
        self._stop_requested.set()
        if self._supervise_task is not None:
            await asyncio.gather(self._supervise_task, return_exceptions=True)
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            await asyncio.gather(self._readiness_task, return_exceptions=True)
        if self._output_task is not None:
            await asyncio.gather(self._output_task, return_exceptions=True)


def _with_admin(
    bootstrap: Mapping[str, Any], socket: Path, admin_port: int | None
) -> dict[str, Any]:
    """A copy of ``bootstrap`` whose admin interface listens where the supervisor says."""
    document: dict[str, Any] = json.loads(json.dumps(bootstrap))  # a deep copy; JSON only
    admin = dict(document.get("admin") or {})
    if admin_port is None:
        admin["address"] = {"pipe": {"path": str(socket), "mode": 0o600}}
    else:
        admin["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
    document["admin"] = admin
    return document


def _uses_lds(bootstrap: Mapping[str, Any]) -> bool:
    dynamic = bootstrap.get("dynamic_resources") or {}
    return bool(dynamic.get("lds_config") or dynamic.get("lds_resources_locator"))


def _static_listeners(bootstrap: Mapping[str, Any]) -> tuple[str, ...]:
    listeners = (bootstrap.get("static_resources") or {}).get("listeners") or []
    return tuple(str(listener["name"]) for listener in listeners if listener.get("name"))


def _open_connections(stats: Mapping[str, int | float | str]) -> int:
    """Connections open on the listeners (not the admin's), from the listeners' totals
    (``listener.ADDRESS.downstream_cx_active``), not their per-worker ones."""
    total = 0
    for name, value in stats.items():
        if name.startswith("listener.admin.") or ".worker_" in name:
            continue
        if isinstance(value, int | float):
            total += int(value)
    return total


def _exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"code {code}"


def _same_file(descriptor: int, path: Path) -> bool:
    """Whether ``descriptor`` is still the file at ``path`` (not one removed since)."""
    try:
        return os.fstat(descriptor).st_ino == os.stat(path).st_ino
    except OSError:
        return False
