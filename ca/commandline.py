"""What every ``tessera`` command shares: option sources, output, errors.

- Every flag may come from the command line, a ``TESSERA_<FLAG>`` environment
  variable, or the TOML file given with ``--config`` — in that order of
  precedence (click's own: command line > environment > ``default_map``).
- Every command that prints data takes ``--output json`` and then prints one
  JSON document on stdout and nothing else there.
- Errors go to stderr as one sentence that says what to do, with exit status 1.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ca.admin_client import AdminClient
from ca.config import ConfigFileUnreadable, load_config_file
from sdk.errors import TesseraError

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_DATA_DIR = ".tessera"


class LazyGroup(click.Group):
    """A group whose named subcommands are imported only when used (``tessera server ...``
    then does not load the agent or the sidecar)."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy or {})  # name -> "module:attribute"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy and cmd_name not in self.commands:
            module_name, _, attribute = self._lazy[cmd_name].partition(":")
            module = importlib.import_module(module_name)
            self.add_command(getattr(module, attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


ARGUMENTS_KEY = "tessera.arguments"


class RootGroup(LazyGroup):
    """The ``tessera`` group. Beyond :class:`LazyGroup`, it answers SPIRE's single-dash
    camelCase flags (``-parentID``), which click reads as ``-p`` and refuses, with the
    Tessera spelling (``--parent-id``), for every command at once."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        arguments = list(args)
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        except click.NoSuchOption as err:
            raise spire_flag_hint(err, arguments) from None
        ctx.meta[ARGUMENTS_KEY] = arguments
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as err:
            raise spire_flag_hint(err, ctx.meta.get(ARGUMENTS_KEY, [])) from None


def spire_flag_hint(err: click.NoSuchOption, arguments: list[str]) -> click.NoSuchOption:
    """``err`` again, or, when it came from a single-dash word such as ``-x509SVIDTTL``,
    a refusal that names the Tessera flag (``--x509-svid-ttl``)."""
    refused = err.option_name
    if refused.startswith("--"):
        return err
    words = [
        a.partition("=")[0] for a in arguments
        if a.startswith("-") and not a.startswith("--") and len(a.partition("=")[0]) > 2
    ]
    # click reads "-parentID" as "-p" "-a" ...; it refuses the first letter it does not know.
    word = next((w for w in words if w.startswith(refused)), None) or next(
        (w for w in words if refused[1:] in w), None
    )
    if word is None or not word[1:].isalnum():
        return err
    command = err.ctx.command if err.ctx is not None else None
    flags = [
        name
        for param in (command.params if command is not None else [])
        for name in (*param.opts, *param.secondary_opts)
        if name.startswith("--")
    ]
    squashed = word[1:].lower()
    flag = next((f for f in flags if f[2:].replace("-", "") == squashed), None)
    if flag is not None:
        hint = f"Tessera spells it {flag}"
    else:
        kebab = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", word[1:]).lower()
        hint = f"Tessera spells flags in kebab-case (--{kebab}), and this command has no such flag"
    return click.NoSuchOption(word, message=f"No such option '{word}'. {hint}.", ctx=err.ctx)


def option(*names: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option that also reads ``TESSERA_<NAME>`` from the environment; for an
    on/off pair (``--admin/--no-admin``) the name is the "on" flag's."""
    long_name = next(n for n in names if n.startswith("--")).partition("/")[0]
    kwargs.setdefault("envvar", "TESSERA_" + long_name[2:].upper().replace("-", "_"))
    kwargs.setdefault("show_envvar", True)
    return click.option(*names, **kwargs)


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return value
    try:
        values = load_config_file(Path(value))
    except ConfigFileUnreadable as err:  # a wrong --config: a usage error
        raise click.BadParameter(err.message, ctx=ctx, param=param) from err
    # A file that is not UTF-8 or not TOML raises its ConfigError, which run() prints as
    # one sentence naming the file and the line.
    ctx.meta["tessera.config_file"] = values
    # A key is the flag's long name with "_" ("--dir" -> dir), or the parameter's name.
    accepted: dict[str, str] = {}
    for flag in ctx.command.params:
        if flag.name:
            accepted[flag.name] = flag.name
            for name in flag.opts:
                if name.startswith("--"):
                    accepted.setdefault(name[2:].replace("-", "_"), flag.name)
    ctx.default_map = {accepted[k]: v for k, v in values.items() if k in accepted}
    by_name = {flag.name: flag for flag in ctx.command.params if flag.name}
    for key, setting in values.items():
        if key in accepted:
            _check_file_value(ctx, by_name[accepted[key]], key, setting, value)
    return value


def _check_file_value(
    ctx: click.Context, flag: click.Parameter, key: str, setting: Any, path: str
) -> None:
    """Refuse a file value of a type the flag cannot take (``insecure_bootstrap = 0``)
    with a sentence; click would fail on it with a traceback."""
    try:
        flag.type_cast_value(ctx, setting)
    except click.BadParameter:
        pass  # click's own sentence, when it uses the value
    except (TypeError, ValueError, AttributeError) as err:
        flag_type = getattr(flag, "is_flag", False) and "true or false"
        expected = flag_type or f"a {flag.type.name}"
        raise click.BadParameter(
            f"{key} in {path} must be {expected}, not {setting!r}", ctx=ctx
        ) from err


def config_option(f: F) -> F:
    return option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config,
        help="TOML file with defaults for these flags.",
    )(f)


def output_option(f: F) -> F:
    return option(
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="'json' prints one JSON document on stdout.",
    )(f)


def admin_options(f: Any) -> Any:
    f = option(
        "--admin-socket",
        type=click.Path(dir_okay=False),
        help="The server's admin socket [default: <data-dir>/admin.sock, or "
        "<data-dir>/server/admin.sock in a 'tessera up' data dir].",
    )(f)
    f = option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=DEFAULT_DATA_DIR,
        show_default=True,
        help="The server's data directory (to find its admin socket).",
    )(f)
    return config_option(f)


def admin_client(admin_socket: str | None, data_dir: str) -> AdminClient:
    return AdminClient(Path(admin_socket) if admin_socket else admin_socket_in(Path(data_dir)))


def admin_socket_in(data_dir: Path) -> Path:
    """``DIR/admin.sock``; or, when that is absent and DIR is a ``tessera up`` data dir,
    the socket of the server ``tessera up`` runs in ``DIR/server``."""
    own = data_dir / "admin.sock"
    up_layout = data_dir / "server" / "admin.sock"
    if not _is_there(own) and _is_there(up_layout):
        return up_layout
    return own


def _is_there(path: Path) -> bool:
    try:
        path.lstat()
    except OSError:  # absent, or in a directory this user may not enter
        return False
    return True


def config_file_values() -> dict[str, Any]:
    ctx = click.get_current_context()
    values: dict[str, Any] = ctx.meta.get("tessera.config_file", {})
    return values


def emit(output: str, data: Any, text: Callable[[], str] | str) -> None:
    """Print ``data`` as JSON, or the human text."""
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    message = text() if callable(text) else text
    if message:
        click.echo(message)


def progress(message: str) -> None:
    """A progress line for a person, on stderr so stdout stays clean for data."""
    click.echo(message, err=True)


def run(command: click.Group) -> None:
    """Run the CLI; TesseraErrors become one sentence on stderr and exit status 1."""
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except TesseraError as err:
        click.echo(f"Error: {err.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
