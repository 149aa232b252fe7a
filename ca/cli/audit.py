"""``tessera server audit ...``: the hash-chained audit log."""

from __future__ import annotations

import sys

import click

from ca.commandline import admin_client, admin_options
from sdk.commandline import emit, option, output_option


@click.group("audit")
def audit_group() -> None:
    """The hash-chained audit log of every issuance and admin change."""


@audit_group.command("list")
@admin_options
@option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True,
        help="How many of the newest events to show.")
@output_option
def audit_list(admin_socket: str | None, data_dir: str, limit: int, output: str) -> None:
    """Show the newest audit events."""
    events = admin_client(admin_socket, data_dir).get(
        "/v1/audit", params={"limit": limit})["events"]

    def text() -> str:
        return "\n".join(
            f"{e['id']:>6}  {e['at']}  {e['actor']:<24} {e['action']:<22} {e['target']}"
            for e in reversed(events)
        ) or "No audit events."

    emit(output, {"events": events}, text)


@audit_group.command("verify")
@admin_options
@output_option
def audit_verify(admin_socket: str | None, data_dir: str, output: str) -> None:
    """Check the audit log's hash chain; exit 1 and name the event if it was tampered with."""
    result = admin_client(admin_socket, data_dir).post("/v1/audit/verify")
    if result["intact"]:
        emit(output, result, f"Audit log intact: {result['checked']} events verified.")
        return
    if output == "json":
        emit(output, result, "")
    click.echo(f"Error: the audit log was tampered with: {result['problem']}.", err=True)
    sys.exit(1)
