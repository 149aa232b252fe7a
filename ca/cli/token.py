"""``tessera server token ...``: join tokens for node attestation."""

from __future__ import annotations

import click

from ca.cli.common import seconds
from ca.commandline import admin_client, admin_options
from sdk.commandline import emit, option, output_option


@click.group("token")
def token_group() -> None:
    """Join tokens for node attestation."""


@token_group.command("generate")
@admin_options
@option("--spiffe-id", help="Make this ID an alias of the agent that uses the token.")
@option("--ttl", default="600", show_default=True, help="How long the token works.")
@output_option
def token_generate(
    admin_socket: str | None, data_dir: str, spiffe_id: str | None, ttl: str, output: str
) -> None:
    """Generate a single-use join token."""
    body = {"spiffe_id": spiffe_id, "ttl": seconds(ttl, "ttl")}
    result = admin_client(admin_socket, data_dir).post("/v1/tokens", json=body)
    emit(output, result, f"Token: {result['token']}")
