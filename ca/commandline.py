"""The server's command-line pieces: the admin socket options and client, and the root
group's hints for SPIRE's flag spellings. What every command shares (option sources,
output, errors) is :mod:`sdk.commandline`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdk.commandline import LazyGroup, config_option, option

__all__ = [
    "ARGUMENTS_KEY",
    "DEFAULT_DATA_DIR",
    "RootGroup",
    "admin_client",
    "admin_options",
    "admin_socket_in",
    "spire_flag_hint",
]

if TYPE_CHECKING:  # httpx comes with the server extra; the root group needs it not
    from ca.admin_client import AdminClient

DEFAULT_DATA_DIR = ".tessera"


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


def admin_options(f: Any) -> Any:
    f = option(
        "--admin-socket",
        type=click.Path(dir_okay=False),
        help="The server's admin socket [default: <data-dir>/admin.sock, or "
        "<data-dir>/server/admin.sock in a 'tessera up' data dir].",
    )(f)
    f = option(
        "--data-dir",
        # Not checked for reading here: only the socket in it is used, and a caller who
        # cannot open that is told which socket and why (ca.admin_client).
        type=click.Path(file_okay=False, readable=False),
        default=DEFAULT_DATA_DIR,
        show_default=True,
        help="The server's data directory (to find its admin socket).",
    )(f)
    return config_option(f)


def admin_client(admin_socket: str | None, data_dir: str) -> AdminClient:
    from ca.admin_client import AdminClient

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
