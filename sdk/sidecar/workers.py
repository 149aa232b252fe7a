"""``tessera sidecar proxy --workers N``: N proxy processes sharing every listener.

One Python process runs Python on one core at a time, so one proxy process
relays at most a core's worth of traffic. With ``--workers N`` the command
becomes a supervisor of N workers, each a complete proxy (``tessera sidecar
proxy`` run again with the hidden ``--worker INDEX``): its own Workload API
stream (the agent serves many), its own policy files watched and reloaded,
and every listener bound by itself with ``SO_REUSEPORT``, so the kernel
spreads new connections across the workers and no descriptor is passed
around. Listeners on port 0 are refused with workers: each worker would get
a port of its own.

The supervisor::

    supervisor = Supervisor(worker_command, count=2, health=HostPort("127.0.0.1", 8090))
    status = eventloop.run(supervisor.run(stop))   # 0 after stop; 1 if workers kept dying

- starts the workers (each in a session of its own, so a terminal's Ctrl-C
  reaches the supervisor only) and waits for each to print ``ready PORT`` on
  its stdout (its own health endpoints' port on 127.0.0.1, or ``-``);
- passes SIGHUP on, and stops them all (SIGTERM, then SIGKILL after the
  shutdown grace) when ``stop`` is set; a worker whose supervisor dies sees
  its stdin end and stops too, so none is left behind;
- starts a worker that exited again after :func:`restart_delay`, and gives up
  (stopping the others, exit status 1) after :data:`QUICK_DEATHS_ALLOWED`
  workers in a row exited within :data:`STABLE_SECONDS` of their start; a
  worker that fails before it is ready at the first start stops them all;
- serves ``/live``, ``/ready`` (ready while every worker runs and its own
  ``/ready`` says so, asked every second) and ``/metrics``: its own
  ``tessera_sidecar_workers`` and ``tessera_sidecar_worker_restarts_total``,
  then every worker's metrics with a ``worker`` label (its index).

Written here rather than taken from a process manager: what it supervises is
itself, started from the same command line, and its health endpoints merge
what the workers count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sdk.address import HostPort
from sdk.sidecar.config import InboundConfig, OutboundConfig, ProxyConfig
from sdk.sidecar.errors import SidecarConfigError
from sdk.sidecar.health import HealthServer
from sdk.sidecar.metrics import SvidMetrics

__all__ = [
    "MAX_WORKERS",
    "QUICK_DEATHS_ALLOWED",
    "STABLE_SECONDS",
    "Supervisor",
    "check_fixed_ports",
    "parse_workers",
    "restart_delay",
]

_log = logging.getLogger("tessera.sidecar")

MAX_WORKERS: Final = 256
STABLE_SECONDS: Final = 30.0
"""A worker that ran this long before exiting is restarted without counting as a quick death."""
QUICK_DEATHS_ALLOWED: Final = 5
"""Workers in a row that may exit within :data:`STABLE_SECONDS` of their start."""
RESTART_DELAY_SECONDS: Final = 0.5
RESTART_DELAY_MAX_SECONDS: Final = 10.0
READY_SLACK_SECONDS: Final = 20.0
"""How much longer than ``--timeout`` a worker may take to print its ready line."""
STOP_SECONDS: Final = 10.0
"""How long stopped workers get (their shutdown grace and more) before SIGKILL."""
READY_CHECK_SECONDS: Final = 1.0
SCRAPE_TIMEOUT_SECONDS: Final = 2.0
SCRAPE_LIMIT: Final = 8 * 1024 * 1024
"""The most a worker's ``/metrics`` answer may hold."""
READY_LINE: Final = "ready"


def parse_workers(value: str) -> int:
    """``--workers``: a count from 1 to :data:`MAX_WORKERS`, or ``auto`` (the CPUs this
    process may run on); SidecarConfigError otherwise."""
    text = value.strip().lower()
    if text == "auto":
        return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise SidecarConfigError(
            f"{value!r} is neither a number from 1 to {MAX_WORKERS} nor 'auto' "
            "(one worker per CPU)"
        )
    return count


def check_fixed_ports(config: ProxyConfig) -> None:
    """SidecarConfigError if a listener has port 0: each worker would get a port of its own."""
    listeners: list[InboundConfig | OutboundConfig] = [*config.inbound, *config.outbound]
    for listener in listeners:
        if listener.listen.port == 0:
            raise SidecarConfigError(
                f"{listener.name}: listen = {str(listener.listen)!r} asks for any free port, "
                "but with --workers every worker binds the listener itself and would get "
                f"another port; give a fixed port in {config.source}, or run one worker"
            )


def restart_delay(quick_deaths: int) -> float:
    """Seconds to wait before starting a worker again, after ``quick_deaths`` workers in a row
    exited soon after their start (0 for one that had run :data:`STABLE_SECONDS`)."""
    if quick_deaths <= 0:
        return RESTART_DELAY_SECONDS
    return min(RESTART_DELAY_SECONDS * 2.0 ** (quick_deaths - 1), RESTART_DELAY_MAX_SECONDS)


class WorkerFailed(Exception):
    """A worker exited (or said nothing) before it was ready."""


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    health_port: int | None = None
    ready: bool = False
    started_at: float = 0.0
    problem: str | None = "starting"
    """Why this worker is not ready now (its own ``/ready`` reason), or None."""
    restarts: int = 0
    stopping: bool = field(default=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class SupervisorMetrics(SvidMetrics):
    """The supervisor's own counts; the workers' metrics follow them on ``/metrics``."""

    def __init__(self) -> None:
        super().__init__()
        self.registry.unregister(self.svid_expiry)  # the workers hold the SVIDs, not the parent
        self.workers = Gauge("tessera_sidecar_workers", "Worker processes running and ready",
                             registry=self.registry)  # fmt: skip
        self.restarts = Counter("tessera_sidecar_worker_restarts",
                                "Workers started again after they exited",
                                registry=self.registry)  # fmt: skip


class Supervisor:
    def __init__(
        self,
        command: Sequence[str],
        count: int,
        *,
        health: HostPort | None,
        ready_timeout: float,
        on_event: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
        delay: Callable[[int], float] = restart_delay,
    ) -> None:
        """``command``: how to start a worker, without its ``--worker INDEX``. ``on_event``
        gets a line for a person at each start, exit and restart; ``delay`` says how long to
        wait before a restart (:func:`restart_delay`)."""
        self._command = list(command)
        self._workers = [_Worker(index) for index in range(count)]
        self._health = health
        self._ready_timeout = ready_timeout
        self._event = on_event
        self._clock = clock
        self._delay = delay
        self._quick_deaths = 0
        self._stopping = False
        self._gave_up = False
        self.metrics = SupervisorMetrics()

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None]

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] = lambda: None) -> int:
        """Start the workers, keep them running until ``stop`` is set, stop them; the exit
        status (1 when a worker failed at the start or they kept dying)."""
        loop = asyncio.get_running_loop()
        server = None
        if self._health is not None:
            server = HealthServer(self._health, self.metrics, ready=self.ready_problem,
                                  more_metrics=self.worker_metrics,
                                  setting="health_bind")  # fmt: skip
            await server.start()
        watchers: list[asyncio.Task[None]] = []
        checker: asyncio.Task[None] | None = None
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        try:
            started = await asyncio.gather(*(self._start(w) for w in self._workers),
                                           return_exceptions=True)  # fmt: skip
            for outcome in started:
                if isinstance(outcome, WorkerFailed):
                    self._event(f"{outcome.args[0]}; stopping the other workers")
                    return 1
                if isinstance(outcome, BaseException):
                    raise outcome
            if server is not None:
                self._event(f"  health:  {server.url}/ready, {server.url}/metrics (every "
                            "worker's metrics, labelled worker=INDEX)")  # fmt: skip
            on_ready()
            watchers = [loop.create_task(self._watch(worker, stop)) for worker in self._workers]
            if server is not None:
                checker = loop.create_task(self._check_ready())
            await stop.wait()
            return 1 if self._gave_up else 0
        finally:
            self._stopping = True
            for task in [*watchers, *([checker] if checker else [])]:
                task.cancel()
            await asyncio.gather(*watchers, *([checker] if checker else []),
                                 return_exceptions=True)  # fmt: skip
            await self._stop_all()
            if server is not None:
                await server.stop()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)

    # -- starting and watching ---------------------------------------------------------

    async def _start(self, worker: _Worker) -> None:
        """Start ``worker`` and wait for its ready line; WorkerFailed if none came."""
        worker.ready, worker.problem, worker.health_port = False, "starting", None
        worker.started_at = self._clock()
        process = await asyncio.create_subprocess_exec(
            *self._command, "--worker", str(worker.index),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        worker.process = process
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), self._ready_timeout)
        except (TimeoutError, ValueError):
            line = b""
        words = line.decode(errors="replace").split()
        if len(words) != 2 or words[0] != READY_LINE:
            await self._stop_one(worker)
            code = process.returncode
            raise WorkerFailed(
                f"worker {worker.index} (pid {process.pid}) "
                + (f"exited with status {code}" if code is not None and code >= 0 else
                   f"was killed by signal {-code}" if code is not None else
                   f"was not ready in {self._ready_timeout:.0f} s")
                + " before it was ready (its message is above)"
            )  # fmt: skip
        worker.health_port = int(words[1]) if words[1].isdigit() else None
        worker.ready, worker.problem = True, None
        self._count_ready()

    async def _watch(self, worker: _Worker, stop: asyncio.Event) -> None:
        """Start ``worker`` again whenever it exits, until stopping; set ``stop`` and give up
        when workers keep exiting soon after their start."""
        while not self._stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping:
                return
            worker.ready, worker.problem = False, "restarting"
            self._count_ready()
            ran = self._clock() - worker.started_at
            self._quick_deaths = 0 if ran >= STABLE_SECONDS else self._quick_deaths + 1
            how = f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"
            if self._quick_deaths > QUICK_DEATHS_ALLOWED:
                self._event(f"Worker {worker.index} (pid {worker.pid}) {how}, the "
                            f"{self._quick_deaths}th worker in a row to exit within "
                            f"{STABLE_SECONDS:.0f} s of its start; giving up and stopping "
                            "the others")  # fmt: skip
                self._gave_up = True
                stop.set()
                return
            delay = self._delay(self._quick_deaths)
            self._event(f"Worker {worker.index} (pid {worker.pid}) {how}; starting it again "
                        f"in {delay:.1f} s")  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            worker.restarts += 1
            self.metrics.restarts.inc()
            try:
                await self._start(worker)
            except WorkerFailed as err:
                self._event(str(err))
                continue  # its exit is seen at once by process.wait()
            self._event(f"Worker {worker.index} started again (pid {worker.pid})")

    def _count_ready(self) -> None:
        self.metrics.workers.set(sum(1 for w in self._workers if w.ready))

    def _forward(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    async def _stop_all(self) -> None:
        await asyncio.gather(*(self._stop_one(w) for w in self._workers))

    async def _stop_one(self, worker: _Worker) -> None:
        process = worker.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_SECONDS)
            except TimeoutError:
                _log.warning("worker %d (pid %d) did not stop in %.0f s; killing it",
                             worker.index, process.pid, STOP_SECONDS)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if process.stdin is not None:
            process.stdin.close()
        worker.ready = False

    # -- health ------------------------------------------------------------------------

    def ready_problem(self) -> str | None:
        for worker in self._workers:
            if not worker.ready:
                return f"worker {worker.index} is {worker.problem or 'not ready'}"
            if worker.problem:
                return f"worker {worker.index} (pid {worker.pid}): {worker.problem}"
        return None

    async def _check_ready(self) -> None:
        while True:
            for worker in self._workers:
                if worker.ready and worker.health_port is not None:
                    worker.problem = await self._worker_problem(worker.health_port)
            await asyncio.sleep(READY_CHECK_SECONDS)

    @staticmethod
    async def _worker_problem(port: int) -> str | None:
        try:
            status, body = await _fetch(port, "/ready", limit=64 * 1024)
        except (OSError, TimeoutError, ValueError) as err:
            return f"its /ready did not answer: {err or type(err).__name__}"
        if status == 200:
            return None
        return body.decode(errors="replace").strip() or f"its /ready answered {status}"

    async def worker_metrics(self) -> bytes:
        """Every ready worker's metrics, each sample labelled with the worker's index."""
        families: dict[str, Metric] = {}
        for worker in self._workers:
            if not worker.ready or worker.health_port is None:
                continue
            try:
                status, body = await _fetch(worker.health_port, "/metrics", limit=SCRAPE_LIMIT)
                if status != 200:
                    continue
                parsed = list(text_string_to_metric_families(body.decode()))
            except (OSError, TimeoutError, ValueError) as err:
                _log.warning("worker %d: reading its metrics failed: %s", worker.index, err)
                continue
            label = str(worker.index)
            for family in parsed:
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type))
                merged.samples.extend(
                    sample._replace(labels={**sample.labels, "worker": label})
                    for sample in family.samples)  # fmt: skip
        registry = CollectorRegistry()
        registry.register(_Families(families.values()))
        return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


async def _fetch(port: int, path: str, *, limit: int) -> tuple[int, bytes]:
    """GET ``path`` from 127.0.0.1:``port`` (a worker's health endpoints): (status, body).
    ValueError when the answer is not HTTP or longer than ``limit``."""

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                         .encode())  # fmt: skip
            data = b""
            while len(data) <= limit and (chunk := await reader.read(limit + 1 - len(data))):
                data += chunk
            if len(data) > limit:
                raise ValueError(f"the answer is longer than {limit} bytes")
            return data
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    raw = await asyncio.wait_for(get(), SCRAPE_TIMEOUT_SECONDS)
    head, separator, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not separator or len(status_line) < 2 or not status_line[1].isdigit():
        raise ValueError("the answer is not HTTP")
    return int(status_line[1]), body
