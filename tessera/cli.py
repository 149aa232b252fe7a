"""The ``tessera`` command: the root group and the product-wide commands.

``tessera init``, ``tessera up`` and ``tessera demo`` live here. The rooms mount
under the root group, each imported only when its name is used, so ``tessera
server entry show`` loads neither the agent nor the sidecar:

    tessera server ...    ca.cli:server            (the server, the CA)
    tessera mesh ...      ca.cli.mesh:mesh_group   (the mesh configuration, on the server)
    tessera agent ...     workload_api.cli:agent
    tessera sidecar ...   dataplane.cli:sidecar    (the SDK's files and proxy, and run)
    tessera gateway ...   dataplane.cli:gateway    (run: the mesh's ingress, an Envoy)

A room whose third-party dependencies are not installed is answered with the
extra to install (``tessera server needs the server extra: pip install
'tessera[server]'``, exit 1), not with a traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Final

import click

from ca.commandline import DEFAULT_DATA_DIR, RootGroup
from sdk.commandline import config_option, emit, option, output_option, progress, run
from sdk.errors import TesseraError

CONTEXT: Final = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# The commands that need extras beyond the base install, and their names.
EXTRAS: Final = {
    "server": ("server",),
    "mesh": ("server",),
    "agent": ("agent",),
    "up": ("server", "agent"),
    "demo": ("server", "agent"),
    "gateway": ("mesh", "envoy"),
}
OWN_PACKAGES: Final = frozenset(
    {"tessera", "ca", "workload_api", "dataplane", "attestor", "sdk", "mesh"}
)


class MissingExtra(click.ClickException):
    """A room's third-party dependency is not installed (exit 1, one sentence)."""


def missing_extra(command: str | None, err: ModuleNotFoundError) -> MissingExtra | None:
    """The refusal naming the extra ``tessera COMMAND`` needs, when ``err`` is about a
    third-party module; ``None`` for one of Tessera's own modules (a bug, not an
    install) or a command that needs no extra."""
    extras = EXTRAS.get(command or "")
    top_level = (err.name or "").partition(".")[0]
    if extras is None or not top_level or top_level in OWN_PACKAGES:
        return None
    return MissingExtra(f"tessera {command} needs {_the_extras(extras)}: "
                        f"pip install 'tessera[{','.join(extras)}]'")


def _the_extras(extras: tuple[str, ...]) -> str:
    """``the server extra``, ``the server and agent extras``."""
    if len(extras) == 1:
        return f"the {extras[0]} extra"
    return f"the {', '.join(extras[:-1])} and {extras[-1]} extras"


class ProductGroup(RootGroup):
    """The root group: :class:`RootGroup`'s lazy rooms and SPIRE flag hints, and the
    extra to install when mounting or running a room lacks a third-party module."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        try:
            return super().get_command(ctx, cmd_name)
        except ModuleNotFoundError as err:
            refusal = missing_extra(cmd_name, err)
            if refusal is None:
                raise
            return _refusing_command(cmd_name, refusal)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as err:  # a room imports the rest of what it needs late
            refusal = missing_extra(ctx.invoked_subcommand, err)
            if refusal is None:
                raise
            raise refusal from None


def _refusing_command(name: str, refusal: MissingExtra) -> click.Command:
    """Stands in for a room that cannot be imported: ``tessera --help`` still lists it,
    and ``tessera NAME ...`` (``--help`` too) says which extra to install."""

    def refuse() -> None:
        raise refusal

    extras = EXTRAS[name]
    return click.Command(
        name,
        callback=refuse,
        short_help=f"Needs {_the_extras(extras)}: pip install 'tessera[{','.join(extras)}]'.",
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


@click.group(
    cls=ProductGroup,
    context_settings=CONTEXT,
    lazy={
        "server": "ca.cli:server",
        "mesh": "ca.cli.mesh:mesh_group",
        "agent": "workload_api.cli:agent",
        "sidecar": "dataplane.cli:sidecar",
        "gateway": "dataplane.cli:gateway",
    },
)
@click.version_option(package_name="tessera", prog_name="tessera")
def cli() -> None:
    """Tessera: zero-trust identity for workloads (SPIFFE server, agent and SDK)."""


def main() -> None:
    run(cli)


# -- tessera init -----------------------------------------------------------------------


@cli.command("init")
@config_option
@option("--trust-domain", required=True, help="The trust domain, e.g. example.org.")
@option("--dir", "directory", required=True, type=click.Path(file_okay=False),
        help="Where to write server.toml, agent.toml and README.md.")
@output_option
def init(trust_domain: str, directory: str, output: str) -> None:
    """Write starter configuration for a new trust domain."""
    from tessera.init import agent_socket, closed_to_others, write_trust_domain_files

    files = write_trust_domain_files(trust_domain, Path(directory))
    socket_path = agent_socket(Path(directory))
    blocked = closed_to_others(socket_path)
    if blocked is not None:
        progress(
            f"Warning: {blocked} is closed to other users, so workloads that run as another "
            f"user cannot reach the agent's socket {socket_path}; choose a --dir every "
            "workload can traverse, or another socket in agent.toml"
        )
    emit(output, {"files": [str(f) for f in files]},
         lambda: "\n".join(f"Wrote {f}" for f in files))


# -- tessera up -------------------------------------------------------------------------


@cli.command("up")
@config_option
@option("--trust-domain", default="example.org", show_default=True,
        help="The trust domain.")
@option("--data-dir", type=click.Path(file_okay=False), default=DEFAULT_DATA_DIR,
        show_default=True, help="Holds server/ and agent/; reused when started again.")
@option("--bind", default="127.0.0.1:8081", show_default=True,
        help="HOST:PORT of the node API; a free port is used if this one is taken.")
@option("--health-bind", default="127.0.0.1:8088", show_default=True,
        help="HOST:PORT of the agent's /live, /ready, /metrics (falls back likewise); 0: off.")
@option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
        default="warning", show_default=True)
@output_option
def up(trust_domain: str, data_dir: str, bind: str, health_bind: str, log_level: str,
       output: str) -> None:
    """Run a server, an agent and an SVID for you, in one process, until Ctrl-C."""
    started = time.monotonic()
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_level == "info":  # one line per request or migration step is noise
        for noisy in ("uvicorn.error", "alembic", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from sdk import eventloop
    from sdk.spiffeid import parse_trust_domain
    from tessera.up import LocalTrustDomain, UpSettings

    settings = UpSettings(parse_trust_domain(trust_domain), Path(data_dir), bind=bind,
                          health_bind=health_bind, log_level=log_level)
    progress(f"Starting trust domain {settings.trust_domain.name} in "
             f"{settings.data_dir.absolute()}")
    local = LocalTrustDomain(settings, progress=progress, started=started)
    eventloop.run(local.run(on_ready=lambda summary: emit(output, summary.to_json(), summary.text)))
    progress("Stopped.")


# -- tessera demo -----------------------------------------------------------------------


@cli.command("demo")
@config_option
@option("--duration", type=click.FloatRange(5, 3600), default=45, show_default=True,
        help="About how long the demo runs, in seconds: its last step, certificates "
             "rotating while calls go on, takes what the others left.")
@option("--svid-ttl", type=click.IntRange(4, 3600), default=10, show_default=True,
        help="Lifetime of the demo's X509-SVIDs, in seconds.")
@output_option
def demo(duration: float, svid_ttl: int, output: str) -> None:
    """A mesh: a gateway routing by URI, a canary, failover, a refused caller and rotation
    under load (with Envoy installed; else two services talking mTLS through sidecars)."""
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    from tessera.demo import run_demo

    echo = progress if output == "json" else click.echo
    result = run_demo(duration, svid_ttl, echo)
    if output == "json":
        emit(output, result.to_json(), "")
    if result.failures:
        raise TesseraError(f"{result.failures} of {result.requests} calls failed during the demo")


if __name__ == "__main__":  # pragma: no cover
    main()
