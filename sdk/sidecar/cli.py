"""``tessera sidecar ...``: the SVID files writer and the mTLS proxy, as commands.

    tessera sidecar files --dir /run/tessera/svid --cmd "nginx -s reload"
    tessera sidecar files --dir ./certs --signal SIGHUP --pid-file /run/nginx.pid --output json
    tessera sidecar proxy --config proxy.toml
    tessera sidecar proxy --config proxy.toml --workers auto

Both find the agent through ``--socket``, else ``$SPIFFE_ENDPOINT_SOCKET``;
wait up to ``--timeout`` seconds at start for it and the first SVID (then
exit 1 with a sentence saying what to do); serve ``/live``, ``/ready`` and
``/metrics``; and stop cleanly on SIGTERM or SIGINT. Progress lines go to
stderr; ``files --output json`` prints one JSON line per write on stdout.

``proxy --workers N`` runs N proxy processes sharing every listener
(:mod:`sdk.sidecar.workers`): this command supervises them, and each is this
command again with the hidden ``--worker INDEX``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import click

from sdk import eventloop
from sdk.address import HostPort
from sdk.commandline import config_option, option, output_option, progress
from sdk.errors import SourceError
from sdk.sidecar.config import ProxyConfig, load_proxy_config, parse_health_bind, parse_svid_id
from sdk.sidecar.connect import connect_x509_source
from sdk.sidecar.errors import SidecarConfigError
from sdk.sidecar.files import FilesSidecar
from sdk.sidecar.health import HealthServer
from sdk.sidecar.metrics import FilesMetrics, ProxyMetrics
from sdk.sidecar.proxy import Proxy
from sdk.sidecar.reload import Reload, command_reload, signal_reload
from sdk.sidecar.svid_files import WrittenSvid
from sdk.sidecar.workers import READY_LINE, READY_SLACK_SECONDS, Supervisor, check_fixed_ports
from sdk.sidecar.workers import parse_workers as _parse_workers
from sdk.sources import WorkloadApiX509Source

__all__ = ["sidecar"]

CONTEXT: Final = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_FILES_HEALTH_BIND: Final = "127.0.0.1:8089"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_SOURCE_CHECK_SECONDS: Final = 1.0


@click.group("sidecar", context_settings=CONTEXT)
def sidecar() -> None:
    """Run next to a workload: keep its SVID files fresh, or proxy its traffic over mTLS."""


def _common_options(f: Callable[..., None]) -> Callable[..., None]:
    f = option("--log-level", type=click.Choice(LOG_LEVELS), default="info",
               show_default=True)(f)  # fmt: skip
    f = option("--timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
               help="Seconds to wait at start for the agent and the first SVID.")(f)  # fmt: skip
    f = option("--spiffe-id", help="Which of the workload's SVIDs to use when it has several "
               "[default: the first the Workload API lists].")(f)  # fmt: skip
    return option("--socket", help="The agent's Workload API socket "
                  "[default: $SPIFFE_ENDPOINT_SOCKET].")(f)  # fmt: skip


# -- tessera sidecar files ---------------------------------------------------------------


@sidecar.command("files")
@config_option
@option("--dir", "directory", required=True, type=click.Path(file_okay=False),
        help="Where to write svid.pem, svid.key (0600), bundle.pem and federated/.")
@option("--cmd", "command", help="Run this after every write, without a shell, "
        "e.g. 'nginx -s reload'.")
@option("--signal", "signal_name", help="Send this signal after every write, e.g. SIGHUP "
        "(with --pid-file).")
@option("--pid-file", type=click.Path(dir_okay=False),
        help="The file holding the pid --signal goes to (read at every write).")
@option("--health-bind", default=DEFAULT_FILES_HEALTH_BIND, show_default=True,
        help="HOST:PORT for /live, /ready and /metrics; 0 turns them off.")
@_common_options
@output_option
def files_command(
    directory: str, command: str | None, signal_name: str | None, pid_file: str | None,
    health_bind: str, socket: str | None, spiffe_id: str | None, timeout: float,
    log_level: str, output: str,
) -> None:  # fmt: skip
    """Write the SVID, its key and bundle into a directory at every rotation, then reload."""
    _configure_logging(log_level)
    reload = _reload(command, signal_name, pid_file)
    health = parse_health_bind(health_bind)
    wanted = parse_svid_id(spiffe_id, what="--spiffe-id") if spiffe_id else None
    target = Path(directory).absolute()
    consequence = (f"the files in {target} are left as they are and not refreshed until an "
                   "SVID is issued again")  # fmt: skip
    source = connect_x509_source(socket, spiffe_id=wanted, timeout=timeout,
                                 consequence=consequence)  # fmt: skip
    progress(f"Watching the Workload API at {source.address} for "
             f"{wanted or 'the default SVID'}; writing into {target}")  # fmt: skip

    def written(result: WrittenSvid) -> None:
        if output == "json":
            click.echo(json.dumps(result.as_json(), sort_keys=True))
        progress(f"Wrote SVID {result.spiffe_id} (serial {result.contents.serial:x}) valid "
                 f"until {_time(result.not_after)} to {target}")  # fmt: skip

    async def serve(stop: asyncio.Event) -> None:
        metrics = FilesMetrics()
        files = FilesSidecar(source, target, reload=reload, on_written=written, metrics=metrics)
        server = HealthServer(health, metrics, ready=files.ready_problem) if health else None
        if server is not None:
            await server.start()
            progress(f"  health:  {server.url}/ready, {server.url}/metrics")
        try:
            await files.run(stop)
        finally:
            if server is not None:
                await server.stop()

    _run(source, serve)


def _reload(command: str | None, signal_name: str | None, pid_file: str | None) -> Reload | None:
    if command and (signal_name or pid_file):
        raise SidecarConfigError(
            "give either --cmd, or --signal with --pid-file, not both; the sidecar does one "
            "thing after each write"
        )
    if command is not None:
        return command_reload(command)
    if signal_name and not pid_file:
        raise SidecarConfigError("--signal needs --pid-file, the file holding the pid to signal")
    if pid_file and not signal_name:
        raise SidecarConfigError("--pid-file needs --signal, the signal to send, e.g. SIGHUP")
    if signal_name and pid_file:
        return signal_reload(signal_name, Path(pid_file).absolute())
    return None


# -- tessera sidecar proxy ---------------------------------------------------------------


class _WorkersType(click.ParamType[int, object]):
    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:  # fmt: skip
        if isinstance(value, int):
            return value
        try:
            return _parse_workers(str(value))
        except SidecarConfigError as err:
            self.fail(err.message, param, ctx)


@sidecar.command("proxy")
@option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
        help="The proxy's TOML file: [[inbound]] and [[outbound]] listeners (docs/sidecar.md).")
@option("--workers", type=_WorkersType(), default="1", show_default=True,
        help="Processes serving every listener (SO_REUSEPORT: the kernel spreads the "
        "connections); 'auto' is one per CPU this process may run on.")
@click.option("--worker", "worker_index", type=click.IntRange(min=0), hidden=True)
@_common_options
def proxy_command(
    config_path: str, workers: int, worker_index: int | None, socket: str | None,
    spiffe_id: str | None, timeout: float, log_level: str,
) -> None:  # fmt: skip
    """mTLS in front of a local app (inbound), and out to mTLS services (outbound)."""
    _configure_logging(log_level)
    config = load_proxy_config(Path(config_path).absolute())
    if worker_index is None and workers > 1:
        check_fixed_ports(config)
        _supervise(config, workers, socket=socket, spiffe_id=spiffe_id, timeout=timeout,
                   log_level=log_level)  # fmt: skip
        return
    worker = worker_index is not None
    wanted = parse_svid_id(spiffe_id, what="--spiffe-id") if spiffe_id else config.spiffe_id
    source = connect_x509_source(
        socket or config.socket, spiffe_id=wanted, timeout=timeout,
        consequence="new connections, inbound and outbound, are refused until an SVID is "
        "issued again",
        socket_setting=f"--socket (or socket in {config.source})",
    )  # fmt: skip
    presenting = (f"presenting {source.x509_svid().spiffe_id} "
                  f"(Workload API {source.address})")  # fmt: skip
    if worker:
        progress(f"Worker {worker_index} (pid {os.getpid()}) {presenting}")
    else:
        progress(f"Sidecar proxy {presenting}")
        _describe_listeners(config)
    # A worker serves its health endpoints on a port of its own, for the supervisor.
    health_bind = config.health_bind
    if worker and health_bind is not None:
        health_bind = HostPort("127.0.0.1", 0)

    async def serve(stop: asyncio.Event) -> None:
        metrics = ProxyMetrics()
        _follow_expiry(source, metrics)
        proxy = Proxy(config, source, metrics=metrics, reuse_port=worker)
        server = None
        if health_bind is not None:
            server = HealthServer(health_bind, metrics,
                                  ready=lambda: (source.problem() or source.no_identity()
                                                 or proxy.ready_problem()),
                                  setting="health_bind")
        try:
            await proxy.start()
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, proxy.reload_policies)
            if server is not None:
                await server.start()
            if worker:
                _follow_supervisor(stop)
                port = server.bound.port if server is not None else "-"
                print(f"{READY_LINE} {port}", flush=True)  # to the supervisor
            else:
                if server is not None:
                    progress(f"  health:  {server.url}/ready, {server.url}/metrics")
                progress("Sidecar proxy is ready. SIGHUP reloads the policy files; Ctrl-C "
                         "stops it.")  # fmt: skip
            await _until(stop, source)
        finally:
            await proxy.stop()
            if server is not None:
                await server.stop()

    _run(source, serve)


def _describe_listeners(config: ProxyConfig) -> None:
    for inbound in config.inbound:
        progress(f"  {inbound.name}: mTLS {inbound.listen} -> {inbound.forward} "
                 f"({inbound.protocol.value}, policy {inbound.policy.source})")  # fmt: skip
    for outbound in config.outbound:
        progress(f"  {outbound.name}: {outbound.listen} -> mTLS {outbound.upstream} "
                 f"({outbound.expected})")  # fmt: skip


def _supervise(config: ProxyConfig, workers: int, *, socket: str | None, spiffe_id: str | None,
               timeout: float, log_level: str) -> None:  # fmt: skip
    """Run ``workers`` copies of this command as workers until SIGTERM/SIGINT; exit status 1
    if one failed at the start or they kept dying."""
    command = [sys.executable, "-c", "from tessera.cli import main; main()", "sidecar",
               "proxy", "--config", str(config.source), "--timeout", str(timeout),
               "--log-level", log_level]  # fmt: skip
    if socket is not None:
        command += ["--socket", socket]
    if spiffe_id is not None:
        command += ["--spiffe-id", spiffe_id]
    progress(f"Sidecar proxy with {workers} worker processes, each binding every listener "
             "(SO_REUSEPORT)")  # fmt: skip
    _describe_listeners(config)
    supervisor = Supervisor(command, workers, health=config.health_bind,
                            ready_timeout=timeout + READY_SLACK_SECONDS,
                            on_event=progress)  # fmt: skip

    def ready() -> None:
        progress(f"Sidecar proxy is ready: {workers} workers, pids "
                 f"{', '.join(map(str, supervisor.pids))}. SIGHUP reloads the policy files; "
                 "Ctrl-C stops it.")  # fmt: skip

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await supervisor.run(stop, on_ready=ready)

    status = eventloop.run(main())
    progress("Sidecar stopped." if status == 0 else "Sidecar stopped: the workers failed.")
    if status:
        sys.exit(status)


def _follow_supervisor(stop: asyncio.Event) -> None:
    """A worker stops when its stdin (a pipe from the supervisor) ends: when the supervisor
    is gone, however it went."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


def _follow_expiry(source: WorkloadApiX509Source, metrics: ProxyMetrics) -> None:
    def update() -> None:
        with contextlib.suppress(SourceError):
            metrics.svid_expiry.set(source.x509_svid().leaf.not_valid_after_utc.timestamp())

    update()
    source.subscribe(update)


# -- running -----------------------------------------------------------------------------


def _run(source: WorkloadApiX509Source, serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``serve`` until SIGTERM/SIGINT; the source is closed afterwards."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(stop)

    try:
        eventloop.run(main())  # uvloop when installed: see sdk/eventloop.py
    finally:
        source.close()
    progress("Sidecar stopped.")


async def _until(stop: asyncio.Event, source: WorkloadApiX509Source) -> None:
    """Until ``stop`` is set; SourceError if the Workload API stream fails for good first."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _SOURCE_CHECK_SECONDS)
        problem = source.problem()
        if problem:
            raise SourceError(problem)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "debug":  # py-spiffe says "Closing X.509 Source" at INFO
        logging.getLogger("spiffe").setLevel(logging.WARNING)


def _time(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
