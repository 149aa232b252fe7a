"""``tessera server jwt mint``: a JWT-SVID minted directly by the server."""

from __future__ import annotations

import click

from ca.commandline import admin_client, admin_options
from sdk.commandline import emit, option, output_option


@click.group("jwt")
def jwt_group() -> None:
    """JWT-SVIDs minted directly by the server."""


@jwt_group.command("mint")
@admin_options
@option("--spiffe-id", required=True, help="The SPIFFE ID of the SVID.")
@option("--audience", required=True, multiple=True, help="An audience (repeatable).")
@option("--ttl", help="Lifetime (default: the server's JWT-SVID TTL).")
@output_option
def jwt_mint(
    admin_socket: str | None, data_dir: str, spiffe_id: str, audience: tuple[str, ...],
    ttl: str | None, output: str,
) -> None:
    """Mint a JWT-SVID."""
    body = {"spiffe_id": spiffe_id, "audience": list(audience), "ttl": ttl}
    result = admin_client(admin_socket, data_dir).post("/v1/jwt/mint", json=body)
    emit(output, result, result["token"])
