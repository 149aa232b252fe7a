"""``tessera server healthcheck``: is the server up, and its datastore."""

from __future__ import annotations

import click

from ca.commandline import admin_client, admin_options
from sdk.commandline import emit, output_option


@click.command("healthcheck")
@admin_options
@output_option
def server_healthcheck(admin_socket: str | None, data_dir: str, output: str) -> None:
    """Exit 0 when the server answers on its admin socket and its datastore is up."""
    health = admin_client(admin_socket, data_dir).get("/v1/health")
    emit(output, health, "Server is healthy.")
