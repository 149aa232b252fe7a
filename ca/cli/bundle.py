"""``tessera server bundle ...``: this trust domain's bundle and federated bundles."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ca.commandline import admin_client, admin_options
from sdk.commandline import emit, option, output_option
from sdk.errors import InvalidArgument

FORMAT = click.Choice(["pem", "spiffe"])


@click.group("bundle")
def bundle_group() -> None:
    """The trust bundle and federated bundles."""


@bundle_group.command("show")
@admin_options
@option("--format", "bundle_format", type=FORMAT, default="pem", show_default=True)
@output_option
def bundle_show(admin_socket: str | None, data_dir: str, bundle_format: str, output: str) -> None:
    """Print this trust domain's bundle."""
    client = admin_client(admin_socket, data_dir)
    if output == "json":
        data = client.get("/v1/bundle", params={"format": "spiffe"}, raw=True)
        emit(output, json.loads(data), "")
        return
    data = client.get("/v1/bundle", params={"format": bundle_format}, raw=True)
    click.echo(data.decode().rstrip("\n"))


@bundle_group.command("list")
@admin_options
@option("--format", "bundle_format", type=FORMAT, default="pem", show_default=True)
@output_option
def bundle_list(admin_socket: str | None, data_dir: str, bundle_format: str, output: str) -> None:
    """Print the federated bundles."""
    fmt = "spiffe" if output == "json" else bundle_format
    bundles = admin_client(admin_socket, data_dir).get(
        "/v1/bundles/federated", params={"format": fmt}
    )["bundles"]

    def text() -> str:
        if not bundles:
            return "No federated bundles."
        parts = []
        for td, bundle in sorted(bundles.items()):
            body = bundle if isinstance(bundle, str) else json.dumps(bundle, indent=2)
            parts.append(f"{'*' * 40}\n* {td}\n{'*' * 40}\n{body.rstrip()}")
        return "\n\n".join(parts)

    emit(output, {"bundles": bundles}, text)


@bundle_group.command("set")
@admin_options
@option("--id", "bundle_id", required=True, help="The federated trust domain, spiffe://TD.")
@option("--path", required=True, type=click.Path(dir_okay=False, allow_dash=True),
        help="The bundle file ('-' reads stdin).")
@option("--format", "bundle_format", type=FORMAT, default="pem", show_default=True)
@output_option
def bundle_set(
    admin_socket: str | None, data_dir: str, bundle_id: str, path: str, bundle_format: str,
    output: str,
) -> None:
    """Create or replace a federated bundle."""
    try:
        data = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"cannot read bundle file {path}: {err}") from err
    body = {"id": bundle_id, "bundle": data, "format": bundle_format}
    result = admin_client(admin_socket, data_dir).put("/v1/bundles/federated", json=body)
    emit(output, result, f"Bundle set for {result['id']}.")


@bundle_group.command("delete")
@admin_options
@option("--id", "bundle_id", required=True, help="The federated trust domain, spiffe://TD.")
@output_option
def bundle_delete(admin_socket: str | None, data_dir: str, bundle_id: str, output: str) -> None:
    """Delete a federated bundle."""
    result = admin_client(admin_socket, data_dir).delete(
        "/v1/bundles/federated", params={"id": bundle_id}
    )
    emit(output, result, f"Bundle deleted for {result['id']}.")
