"""What every ``tessera`` command shares (server, agent, sidecar): option sources,
output, errors.

- Every flag may come from the command line, a ``TESSERA_<FLAG>`` environment
  variable, or the TOML file given with ``--config`` — in that order of
  precedence (click's own: command line > environment > ``default_map``).
- Every command that prints data takes ``--output json`` and then prints one
  JSON document on stdout and nothing else there.
- Errors go to stderr as one sentence that says what to do, with exit status 1.

The server's own pieces (the admin socket options, SPIRE flag hints) are in
:mod:`ca.commandline`.

Tessera-internal: used by the server, the agent and the sidecar, not part of the SDK's
public API (it is not in ``sdk.__all__``) and may change without notice.
"""

from __future__ import annotations

import importlib
import json
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sdk.errors import ConfigError, TesseraError

__all__ = [
    "ConfigFileUnreadable",
    "LazyGroup",
    "config_file_values",
    "config_option",
    "emit",
    "load_config_file",
    "option",
    "output_option",
    "progress",
    "run",
]

F = TypeVar("F", bound=Callable[..., Any])


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


class ConfigFileUnreadable(ConfigError):
    """The config file could not be read at all (missing, not permitted)."""


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file; ConfigError with the line for bytes that are not UTF-8
    and for a syntax error."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigFileUnreadable(f"cannot read config file {path}: {err.strerror}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (line {line} has the byte "
            f"0x{data[err.start]:02x}); TOML files must be UTF-8, so save it as UTF-8"
        ) from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            f"config file {path} is not valid TOML: {err}; correct that line"
        ) from err


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
