"""``tessera server console``: the web console, beside a running server.

Its own flags read ``TESSERA_CONSOLE_*`` from the environment (not ``TESSERA_BIND``,
which ``tessera server run`` reads for its node API).

It reads the server through its admin socket, so whoever may run it holds the same
authority as ``tessera server ...`` commands; it gives that view to one browser, through
a one-time token on loopback, or to SPIFFE IDs registered as admin over mTLS
(:mod:`ca.console`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import socket
import sys
from pathlib import Path

import click

from ca.commandline import admin_options, admin_socket_in
from sdk.commandline import option, output_option, progress

DEFAULT_BIND = "127.0.0.1:8282"
CONSOLE_PATH = "/tessera/console"
"""The path of the SPIFFE ID the console presents over mTLS."""


@click.command("console")
@admin_options
@option("--bind", default=DEFAULT_BIND, envvar="TESSERA_CONSOLE_BIND", show_default=True,
        help="HOST:PORT the console listens on (port 0: any free one). An address other "
             "than loopback needs --mtls.")
@option("--prometheus", metavar="URL", envvar="TESSERA_CONSOLE_PROMETHEUS",
        help="A Prometheus scraping the sidecars (e.g. http://127.0.0.1:9090): the mesh "
             "page's topology shows their request rates, errors and latency.")
@option("--rate-window", default="1m", envvar="TESSERA_CONSOLE_RATE_WINDOW", show_default=True,
        help="The window the topology's rates are taken over (a Prometheus duration).")
@option("--write", is_flag=True, envvar="TESSERA_CONSOLE_WRITE",
        help="Allow changes (evict, ban and unban agents, each behind a confirmation).")
@option("--mtls", is_flag=True, envvar="TESSERA_CONSOLE_MTLS",
        help="Serve HTTPS to callers presenting an X509-SVID whose SPIFFE ID is "
             "registered as admin, instead of the one-time token.")
@output_option
def server_console(admin_socket: str | None, data_dir: str, bind: str,
                   prometheus: str | None, rate_window: str, write: bool, mtls: bool,
                   output: str) -> None:
    """Serve the web console: the trust domain and the mesh at a glance.

    Prints a URL with a one-time token; open it in a browser (on this machine, or
    through an SSH tunnel). The token opens one browser session; run the command again
    for another.
    """
    from sdk.address import HostPort

    address = HostPort.parse(bind, what="--bind", example=DEFAULT_BIND, any_port=True)
    if not mtls and not _loopback(address.host):
        raise click.UsageError(
            f"--bind {bind} is not a loopback address: the console holds the admin "
            "socket's authority, so anywhere else it needs --mtls (callers then present "
            "an X509-SVID registered as admin)")
    if not _valid_window(rate_window):
        raise click.UsageError(f"--rate-window {rate_window!r} is not a Prometheus "
                               "duration of a second or more, such as 30s, 5m or 1h30m")
    if prometheus is not None and not prometheus.startswith(("http://", "https://")):
        raise click.UsageError(f"--prometheus {prometheus!r} is not an http(s) URL")
    socket_path = Path(admin_socket) if admin_socket else admin_socket_in(Path(data_dir))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sdk import eventloop

    eventloop.run(_serve(socket_path, address.host, address.port, prometheus=prometheus,
                         rate_window=rate_window, write=write, mtls=mtls, output=output))


async def _serve(socket_path: Path, host: str, port: int, *, prometheus: str | None,
                 rate_window: str, write: bool, mtls: bool, output: str) -> None:
    from ca.api.limits import ConnectionGuard, LimitedServer, listener_config
    from ca.config import ConnectionLimits
    from ca.console.access import Access, loopback_hosts
    from ca.console.app import Console, Settings
    from ca.console.sources import AdminSource, PrometheusSource, SourceError

    admin = AdminSource(socket_path)
    try:
        found = await admin.get("/v1/health")
    except SourceError as err:
        await admin.close()
        raise click.ClickException(str(err)) from err
    trust_domain = str(found["trust_domain"])
    listener = _listen(host, port)
    port = listener.getsockname()[1]
    limits = ConnectionLimits()
    identity = None
    if mtls:
        from ca.console.identity import ConsoleIdentity

        identity = ConsoleIdentity(admin, f"spiffe://{trust_domain}{CONSOLE_PATH}")
        try:
            await identity.start()
        except SourceError as err:
            await admin.close()
            raise click.ClickException(f"could not get the console's SVID: {err}") from err
    token = None if mtls else Access.new_token()
    access = Access(token=token, hosts=() if mtls else loopback_hosts(port))
    settings = Settings(
        trust_domain=trust_domain, admin=admin, access=access,
        prometheus=PrometheusSource(prometheus) if prometheus else None,
        write=write, rate_window=rate_window,
        admin_check=identity.is_admin if identity is not None else None,
        secure_cookie=mtls,
    )
    console = Console(settings)
    if identity is not None:
        console.changes.listeners.append(identity.changed)
    config = listener_config(console.app, ConnectionGuard("console", limits.max_connections,
                                                          limits.max_connections_per_peer),
                             limits, host=host, port=port,
                             ssl_context=identity.context() if identity is not None else None)
    from uvicorn.lifespan.on import LifespanOn

    config.lifespan_class = LifespanOn  # the console's event stream starts and stops with it
    server = LimitedServer(config, limits)
    shown = f"[{host}]" if ":" in host else host
    url = (f"https://{shown}:{port}/" if mtls else f"http://{shown}:{port}/?token={token}")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if output == "json":
        click.echo(json.dumps({"url": url, "trust_domain": trust_domain, "port": port,
                               "write": write, "mtls": mtls}), nl=True)
        sys.stdout.flush()
    else:
        progress(f"Tessera console for {trust_domain} ({'read-write' if write else 'read-only'})")
        if mtls:
            progress("  For X509-SVIDs registered as admin:")
            click.echo(f"  {url}")
        else:
            progress("  Open this URL once; its token is for one browser:")
            click.echo(f"  {url}")
        progress("Ctrl-C stops it.")
    try:
        await serving
    finally:
        if identity is not None:
            await identity.stop()
        listener.close()
    progress("Console stopped.")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as err:
        listener.close()
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {err.strerror}; choose another --bind") from err
    listener.listen(128)
    listener.setblocking(False)
    return listener


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Prometheus's duration units, largest first, in seconds.
_UNITS = (("y", 365 * 86400), ("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60),
          ("s", 1), ("ms", 0.001))


def _valid_window(window: str) -> bool:
    """A Prometheus range duration (``30s``, ``5m``, ``1h30m``: units largest first,
    each once) of at least a second."""
    import re

    parts = re.fullmatch("".join(rf"(?:(\d{{1,6}}){unit})?" for unit, _ in _UNITS), window)
    if parts is None:
        return False
    total = sum(int(count) * size for count, (_, size) in zip(parts.groups(), _UNITS,
                                                                 strict=True) if count)
    return total >= 1

