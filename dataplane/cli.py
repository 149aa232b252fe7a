"""``tessera sidecar ...``: the SDK's ``files`` and ``proxy``, and ``run``, the mesh's
sidecar; ``tessera gateway run``, the mesh's ingress.

    tessera sidecar run --service users-service --spiffe-id spiffe://example.org/users \\
        --app 127.0.0.1:8080 --label app=users [--proxy envoy --outbound 127.0.0.1:15001]
    tessera gateway run --label istio=ingressgateway --port-offset 18000

``run`` serves the app as an instance of its Service (:mod:`dataplane.sidecar`): callers
through ``--inbound`` (mTLS, each request judged by the mesh's AuthorizationPolicies),
registered through the agent. ``gateway run`` serves the Gateway resources that select
its labels (:mod:`dataplane.gateway`), with Envoy or the built-in proxy
(:mod:`dataplane.builtin_gateway`). Progress lines go to stderr;
both stop on SIGTERM or SIGINT, draining open connections.

``files`` and ``proxy`` are :mod:`sdk.sidecar.cli`'s, and work on the base install. ``run``
needs the mesh's configuration model (pydantic, PyYAML, RE2: the agent extra carries
them); it imports it only when it runs, and says which extra to install when it is
missing. Usage errors (a malformed flag, a data plane or flag not supported yet) exit 2
before anything starts; the rest exit 1 with a sentence, as the other sidecars do.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Final, TypeVar

import click

from dataplane.planes import PLANES, SidecarSettings
from sdk import eventloop
from sdk.address import HostPort
from sdk.commandline import config_option, option, progress
from sdk.errors import ConfigError
from sdk.sidecar import cli as sdk_cli
from sdk.sidecar.config import parse_health_bind, parse_svid_id
from sdk.sidecar.connect import connect_x509_source
from sdk.sidecar.errors import SidecarConfigError

__all__ = ["gateway", "sidecar"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_INBOUND: Final = "0.0.0.0:15006"
"""Istio's inbound port."""
DEFAULT_HEALTH_BIND: Final = "127.0.0.1:15020"
"""Istio's port for the sidecar's health and merged metrics."""
DEFAULT_GATEWAY_HEALTH_BIND: Final = "127.0.0.1:15021"
"""Istio's gateway health port."""
MESH_EXTRA: Final = "mesh"
_OWN_PACKAGES: Final = frozenset({"mesh", "sdk", "dataplane"})


def _start_options(command: F) -> F:
    """``--timeout`` and ``--log-level``, as every long-running proxy command takes them."""
    command = option("--log-level", type=click.Choice(sdk_cli.LOG_LEVELS), default="info",
                     show_default=True)(command)  # fmt: skip
    timeout = option("--timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
                     help="Seconds to wait at start for the agent and the first SVID.")  # fmt: skip
    return timeout(command)


sidecar = click.Group(
    "sidecar",
    commands=dict(sdk_cli.sidecar.commands),
    context_settings=sdk_cli.CONTEXT,
    help="Run next to a workload: keep its SVID files fresh, proxy its traffic over mTLS, "
    "or serve it as an instance of a mesh Service.",
)


@sidecar.command("run")
@config_option
@option(
    "--service", required=True, help="The Service the app is an instance of (its metadata.name)."
)
@option(
    "--spiffe-id",
    required=True,
    help="Which of the workload's SVIDs to serve with; the Service must name it in spec.spiffeIds.",
)
@option(
    "--app",
    required=True,
    metavar="HOST:PORT",
    help="Where the app listens, plain HTTP; the agent checks its health there too.",
)
@option(
    "--inbound",
    default=DEFAULT_INBOUND,
    show_default=True,
    metavar="HOST:PORT",
    help="The mTLS listener callers reach; registered as the instance's address "
    "(this host's, when it listens on every address).",
)
@option(
    "--outbound",
    metavar="HOST:PORT",
    help="An HTTP listener for the app's calls to other Services, routed by Host; keep "
    "it on loopback (--proxy envoy; the built-in proxy does not have it yet).",
)
@option(
    "--label",
    "labels",
    multiple=True,
    metavar="K=V",
    help="A label of the instance, which AuthorizationPolicies select by; repeat it.",
)
@option(
    "--proxy",
    "plane",
    type=click.Choice(list(PLANES)),
    default=next(iter(PLANES)),
    show_default=True,
    help="The data plane.",
)
@option("--socket", help="The agent's Workload API socket [default: $SPIFFE_ENDPOINT_SOCKET].")
@option(
    "--health-bind",
    default=DEFAULT_HEALTH_BIND,
    show_default=True,
    help="HOST:PORT for /live, /ready and /metrics; 0 turns them off.",
)
@_start_options
def run_command(
    service: str, spiffe_id: str, app: str, inbound: str, outbound: str | None,
    labels: tuple[str, ...], plane: str, socket: str | None, health_bind: str,
    timeout: float, log_level: str,
) -> None:  # fmt: skip
    """Serve an app as an instance of a mesh Service: mTLS in, judged by the mesh."""
    settings = SidecarSettings(
        service=service,
        spiffe_id=_usage(lambda: parse_svid_id(spiffe_id, what="--spiffe-id")),
        app=_address(app, "--app", "127.0.0.1:8080"),
        inbound=_address(inbound, "--inbound", DEFAULT_INBOUND, any_port=True),
        outbound=_address(outbound, "--outbound", "127.0.0.1:15001") if outbound else None,
        labels=_labels(labels),
    )
    kind = PLANES[plane]
    refusal = kind.refusal(settings)
    if refusal is not None:
        raise click.UsageError(refusal)
    _require_mesh("sidecar run")
    unavailable = kind.unavailable()
    if unavailable is not None:
        raise click.ClickException(unavailable)
    _check_names(settings)
    health = _usage(lambda: parse_health_bind(health_bind))
    _configure_logging(log_level)

    with _stopped_by_signal("Sidecar"):
        source = connect_x509_source(
            socket, spiffe_id=settings.spiffe_id, timeout=timeout,
            consequence="new connections are refused until an SVID is issued again",
        )  # fmt: skip
    from dataplane.sidecar import Sidecar

    progress(f"Sidecar for {settings.service} presenting {source.x509_svid().spiffe_id} "
             f"(Workload API {source.address}; the {plane} proxy)")  # fmt: skip
    runner = Sidecar(settings, source, kind, socket=source.address, health_bind=health,
                     progress=progress, log_level=log_level)  # fmt: skip
    try:
        _run_until_signal(runner.run, plane)
    finally:
        source.close()
    progress("Sidecar stopped.")


gateway = click.Group(
    "gateway",
    context_settings=sdk_cli.CONTEXT,
    help="Run the mesh's ingress gateway: the Gateway resources that select its labels, "
    "served by an Envoy the agent configures or by the built-in proxy.",
)


@gateway.command("run")
@config_option
@option(
    "--label",
    "labels",
    multiple=True,
    required=True,
    metavar="K=V",
    help="A label of the gateway; it serves the Gateways whose selector matches its "
    "labels. Repeat it.",
)
@option(
    "--spiffe-id",
    help="Which of the process's SVIDs to call into the mesh with [default: its first].",
)
@option(
    "--proxy",
    "plane",
    type=click.Choice(["envoy", "builtin"]),
    default="envoy",
    show_default=True,
    help="The data plane: Envoy, or Tessera's own proxy (no JWT checks yet).",
)
@option("--socket", help="The agent's Workload API socket [default: $SPIFFE_ENDPOINT_SOCKET].")
@option(
    "--port-offset",
    type=click.IntRange(min=-65535, max=65535),
    default=0,
    show_default=True,
    help="Listen on each Gateway server's port plus N (port 80 with "
    "--port-offset 18000 listens on 18080).",
)
@option(
    "--health-bind",
    default=DEFAULT_GATEWAY_HEALTH_BIND,
    show_default=True,
    help="HOST:PORT for /live, /ready and /metrics; 0 turns them off.",
)
@_start_options
def gateway_run_command(
    labels: tuple[str, ...], spiffe_id: str | None, plane: str, socket: str | None,
    port_offset: int, health_bind: str, timeout: float, log_level: str,
) -> None:  # fmt: skip
    """Serve the mesh's Gateways that select these labels, with Envoy or the built-in proxy."""
    chosen = _labels(labels)
    wanted = _usage(lambda: parse_svid_id(spiffe_id, what="--spiffe-id")) if spiffe_id else None
    _require_mesh("gateway run")
    from mesh.registration import label_problem

    problem = label_problem(chosen)
    if problem is not None:
        raise click.UsageError(f"--label: {problem}")
    unavailable = PLANES["envoy"].unavailable() if plane == "envoy" else None
    if unavailable is not None:
        raise click.ClickException(unavailable.replace("--proxy envoy", "tessera gateway run"))
    health = _usage(lambda: parse_health_bind(health_bind))
    _configure_logging(log_level)

    with _stopped_by_signal("Gateway"):
        source = connect_x509_source(
            socket, spiffe_id=wanted, timeout=timeout,
            consequence="the gateway's calls into the mesh fail until an SVID is issued again",
        )  # fmt: skip
    from dataplane.gateway import GatewaySettings, build_gateway

    settings = GatewaySettings(labels=chosen, port_offset=port_offset,
                               spiffe_id=str(wanted) if wanted else None)  # fmt: skip
    selector = ",".join(f"{k}={v}" for k, v in sorted(chosen.items()))
    carrier = "Envoy" if plane == "envoy" else "the built-in proxy"
    progress(f"Gateway {selector} presenting {source.x509_svid().spiffe_id} "
             f"(Workload API {source.address}; {carrier})")  # fmt: skip
    try:
        runner = build_gateway(plane, settings, source, socket=source.address,
                               health_bind=health, progress=progress, log_level=log_level)
    except SidecarConfigError:
        source.close()
        raise
    try:
        _run_until_signal(runner.run, plane)
    finally:
        source.close()
    progress("Gateway stopped.")


def _run_until_signal(run: Callable[[asyncio.Event], Awaitable[None]], plane: str) -> None:
    """``run(stop)`` on an event loop, ``stop`` set on SIGTERM or SIGINT.

    With the built-in proxy the process carries the traffic itself, and uvloop does its
    socket and TLS work in C: about a fifth more requests per CPU-second and a p99 a
    quarter of asyncio's at 32 connections (docs/performance.md). What else runs in it
    works there as well: grpc.aio (the mesh watch and the instance registration to the
    agent) drives its calls through the running loop's public API whatever loop that
    is, the Workload API source runs in threads of its own, and the built-in sidecar's
    integration tests pass on both loops. Envoy does the traffic of ``--proxy envoy``,
    and the process that supervises it stays on asyncio's loop, as it has always run
    (``TESSERA_EVENT_LOOP`` overrides either choice).
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run(stop)

    eventloop.run(main(), default="uvloop" if plane == "builtin" else "asyncio")


@contextlib.contextmanager
def _stopped_by_signal(what: str) -> Iterator[None]:
    """While waiting for the agent at start: SIGTERM or SIGINT says so and exits 128+N."""

    def stopped(signum: int, _frame: object) -> None:
        progress(
            f"{what} stopped by {signal.Signals(signum).name} while waiting for the "
            "agent and the first SVID."
        )
        raise SystemExit(128 + signum)

    previous = {
        signum: signal.signal(signum, stopped) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _usage(parse: Callable[[], T]) -> T:
    """``parse()``, its error a usage error (exit 2)."""
    try:
        return parse()
    except (ConfigError, SidecarConfigError) as err:
        raise click.UsageError(err.message) from err


def _address(text: str, flag: str, example: str, *, any_port: bool = False) -> HostPort:
    return _usage(lambda: HostPort.parse(text, what=flag, example=example, any_port=any_port))


def _labels(values: tuple[str, ...]) -> Mapping[str, str]:
    labels: dict[str, str] = {}
    for value in values:
        key, equals, label = value.partition("=")
        if not equals or not key:
            raise click.UsageError(f"--label {value!r} is not K=V, e.g. --label app=users")
        if key in labels:
            raise click.UsageError(f"--label {key} is given twice; give each label once")
        labels[key] = label
    return labels


def _require_mesh(command: str) -> None:
    """Import the mesh's model now; without its third-party modules, name the extra."""
    try:
        importlib.import_module("mesh").load_all()
    except ModuleNotFoundError as err:
        top_level = (err.name or "").partition(".")[0]
        if not top_level or top_level in _OWN_PACKAGES:
            raise
        raise click.ClickException(
            f"tessera {command} needs the {MESH_EXTRA} extra: pip install 'tessera[{MESH_EXTRA}]'"
        ) from None


def _check_names(settings: SidecarSettings) -> None:
    from mesh.names import check_dns_label
    from mesh.registration import label_problem

    try:
        check_dns_label(settings.service)
    except ValueError as err:
        raise click.UsageError(f"--service {settings.service!r} {err}") from err
    problem = label_problem(settings.labels)
    if problem is not None:
        raise click.UsageError(f"--label: {problem}")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level != "debug":  # py-spiffe says "Closing X.509 Source" at INFO
        logging.getLogger("spiffe").setLevel(logging.WARNING)
