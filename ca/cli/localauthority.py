"""``tessera server localauthority x509|jwt ...``: this server's signing authorities."""

from __future__ import annotations

from typing import Any

import click

from ca.cli.common import timestamp
from ca.commandline import admin_client, admin_options
from sdk.commandline import emit, option, output_option


@click.group("localauthority")
def localauthority_group() -> None:
    """This server's signing authorities: show, prepare and activate keys."""


def authority_text(authorities: list[dict[str, Any]]) -> str:
    if not authorities:
        return "No authorities."
    blocks = []
    for a in authorities:
        blocks.append("\n".join([
            f"{a['status'].capitalize()} {a['kind'].upper()} authority"
            f"{' (tainted)' if a['tainted'] else ''}:",
            f"  Authority ID : {a['authority_id']}",
            f"  Key type     : {a['key_type']}",
            f"  Expires at   : {timestamp(a['expires_at'])}",
        ]))
    return "\n".join(blocks)


def _authority_commands(kind: str) -> click.Group:
    @click.group(kind, help=f"The {kind.upper()} authorities of this server.")
    def group() -> None:
        pass

    @group.command("show")
    @admin_options
    @output_option
    def show(admin_socket: str | None, data_dir: str, output: str) -> None:
        """Show the active, prepared and old authorities."""
        result = admin_client(admin_socket, data_dir).get(f"/v1/localauthority/{kind}")
        emit(output, result, lambda: authority_text(result["authorities"]))

    @group.command("prepare")
    @admin_options
    @output_option
    def prepare(admin_socket: str | None, data_dir: str, output: str) -> None:
        """Prepare the next authority now (published in the bundle, not signing)."""
        result = admin_client(admin_socket, data_dir).post(f"/v1/localauthority/{kind}/prepare")
        emit(output, result, lambda: authority_text([result]))

    @group.command("activate")
    @admin_options
    @output_option
    def activate(admin_socket: str | None, data_dir: str, output: str) -> None:
        """Activate the prepared authority now."""
        result = admin_client(admin_socket, data_dir).post(f"/v1/localauthority/{kind}/activate")
        emit(output, result, lambda: authority_text([result]))

    @group.command("taint")
    @admin_options
    @option("--authority-id", required=True, help="The authority (from 'show').")
    @output_option
    def taint(admin_socket: str | None, data_dir: str, authority_id: str, output: str) -> None:
        """Mark a no-longer-active authority tainted: agents replace the SVIDs it signed."""
        result = admin_client(admin_socket, data_dir).post(
            f"/v1/localauthority/{kind}/taint", json={"authority_id": authority_id})
        emit(output, result, lambda: authority_text([result]))

    @group.command("revoke")
    @admin_options
    @option("--authority-id", required=True, help="The tainted authority (from 'show').")
    @output_option
    def revoke(admin_socket: str | None, data_dir: str, authority_id: str, output: str) -> None:
        """Remove a tainted authority from the bundle; what it signed stops validating."""
        result = admin_client(admin_socket, data_dir).post(
            f"/v1/localauthority/{kind}/revoke", json={"authority_id": authority_id})
        emit(output, result, lambda: authority_text([result]))

    return group


localauthority_group.add_command(_authority_commands("x509"))
localauthority_group.add_command(_authority_commands("jwt"))
