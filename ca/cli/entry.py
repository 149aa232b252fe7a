"""``tessera server entry ...``: registration entries (which workloads get which IDs)."""

from __future__ import annotations

from typing import Any

import click

from ca.cli.common import emit_found, seconds
from ca.commandline import admin_client, admin_options
from sdk.commandline import emit, option, output_option, progress
from sdk.errors import InvalidArgument


def entry_flags(f: Any) -> Any:
    for decorator in reversed([
        option("--parent-id", help="The ID of the agent (or alias) the entry is under."),
        option("--spiffe-id", help="The SPIFFE ID the workload gets."),
        option("--selector", multiple=True, help="type:value, e.g. unix:uid:1000 (repeatable)."),
        option("--x509-svid-ttl", help="X509-SVID lifetime (default: the server's)."),
        option("--jwt-svid-ttl", help="JWT-SVID lifetime (default: the server's)."),
        option("--dns", multiple=True, help="A DNS SAN for the X509-SVID (repeatable)."),
        option("--federates-with", multiple=True, help="A trust domain (repeatable)."),
        option("--admin/--no-admin", "admin", default=None,
               help="Grant (or, on update, withdraw) admin API access."),
        option("--downstream/--no-downstream", "downstream", default=None,
               help="A downstream CA entry (or no longer one)."),
        option("--node/--no-node", "node", default=None,
               help="A node alias entry, matched against node selectors (or no longer one)."),
        option("--hint", help="A hint for workloads holding several SVIDs."),
        option("--entry-expiry", type=int, help="UNIX time after which the entry is ignored."),
    ]):
        f = decorator(f)
    return f


def entry_body(flags: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = dict(base or {})
    pairs = {
        "spiffe_id": flags.get("spiffe_id"),
        "parent_id": flags.get("parent_id"),
        "hint": flags.get("hint"),
        "expires_at": flags.get("entry_expiry"),
        "admin": flags.get("admin"),
        "downstream": flags.get("downstream"),
        "node": flags.get("node"),
    }
    body.update({k: v for k, v in pairs.items() if v is not None})
    if flags.get("selector"):
        body["selectors"] = list(flags["selector"])
    if flags.get("dns"):
        body["dns_names"] = list(flags["dns"])
    if flags.get("federates_with"):
        body["federates_with"] = list(flags["federates_with"])
    if flags.get("x509_svid_ttl") is not None:
        body["x509_svid_ttl"] = seconds(flags["x509_svid_ttl"], "x509-svid-ttl")
    if flags.get("jwt_svid_ttl") is not None:
        body["jwt_svid_ttl"] = seconds(flags["jwt_svid_ttl"], "jwt-svid-ttl")
    return body


def warn_unknown_selector_types(entry: dict[str, Any]) -> None:
    """Warn on stderr about selector types no workload attestor produces (``uid:1`` for
    ``unix:uid:1``): SPIRE accepts any type, so the entry keeps them, but no agent of
    ours would match them. Node entries match node attestors' selectors, not these."""
    if entry["node"]:
        return
    from attestor.workload import WORKLOAD_ATTESTORS

    known = WORKLOAD_ATTESTORS.names()
    for selector_type in dict.fromkeys(s["type"] for s in entry["selectors"]):
        if selector_type not in known:
            progress(
                f"Warning: no workload attestor knows the selector type {selector_type!r} "
                f"(known: {', '.join(known)}); the entry keeps it (SPIRE's rule), but only a "
                "workload attestor of that type could ever match it"
            )


def entry_text(entry: dict[str, Any]) -> str:
    def ttl(value: int) -> str:
        return "default" if not value else str(value)

    lines = [
        f"Entry ID         : {entry['id']}",
        f"SPIFFE ID        : {entry['spiffe_id']}",
        f"Parent ID        : {entry['parent_id']}",
        f"Revision         : {entry['revision_number']}",
        f"X509-SVID TTL    : {ttl(entry['x509_svid_ttl'])}",
        f"JWT-SVID TTL     : {ttl(entry['jwt_svid_ttl'])}",
    ]
    lines += [f"Selector         : {s['type']}:{s['value']}" for s in entry["selectors"]]
    lines += [f"DNS name         : {d}" for d in entry["dns_names"]]
    lines += [f"FederatesWith    : {td}" for td in entry["federates_with"]]
    for flag, label in (("admin", "Admin"), ("downstream", "Downstream"), ("node", "Node")):
        if entry[flag]:
            lines.append(f"{label:<17}: true")
    if entry["hint"]:
        lines.append(f"Hint             : {entry['hint']}")
    if entry["expires_at"]:
        lines.append(f"Entry expiry     : {entry['expires_at']}")
    return "\n".join(lines)


@click.group("entry")
def entry_group() -> None:
    """Registration entries: which workloads get which SPIFFE IDs."""


@entry_group.command("create")
@admin_options
@entry_flags
@output_option
def entry_create(admin_socket: str | None, data_dir: str, output: str, **flags: Any) -> None:
    """Create a registration entry."""
    missing = [f"--{n.replace('_', '-')}" for n in ("parent_id", "spiffe_id")
               if not flags.get(n)]
    if missing:
        raise InvalidArgument(f"{' and '.join(missing)} must be given to create an entry")
    body = entry_body(flags)
    entry = admin_client(admin_socket, data_dir).post("/v1/entries", json=body)
    warn_unknown_selector_types(entry)
    emit(output, entry, lambda: entry_text(entry))


@entry_group.command("update")
@admin_options
@option("--entry-id", required=True, help="The entry to change.")
@entry_flags
@output_option
def entry_update(
    admin_socket: str | None, data_dir: str, entry_id: str, output: str, **flags: Any
) -> None:
    """Change an entry; fields not given keep their values."""
    client = admin_client(admin_socket, data_dir)
    current = client.get(f"/v1/entries/{_path_id(entry_id)}")
    base = {
        "spiffe_id": current["spiffe_id"],
        "parent_id": current["parent_id"],
        "selectors": [f"{s['type']}:{s['value']}" for s in current["selectors"]],
        "x509_svid_ttl": current["x509_svid_ttl"],
        "jwt_svid_ttl": current["jwt_svid_ttl"],
        "dns_names": current["dns_names"],
        "federates_with": current["federates_with"],
        "admin": current["admin"],
        "downstream": current["downstream"],
        "node": current["node"],
        "hint": current["hint"],
        "expires_at": current["expires_at"],
    }
    entry = client.put(f"/v1/entries/{_path_id(entry_id)}", json=entry_body(flags, base))
    if flags.get("selector"):
        warn_unknown_selector_types(entry)
    emit(output, entry, lambda: entry_text(entry))


@entry_group.command("delete")
@admin_options
@option("--entry-id", required=True, help="The entry to delete.")
@output_option
def entry_delete(admin_socket: str | None, data_dir: str, entry_id: str, output: str) -> None:
    """Delete an entry."""
    result = admin_client(admin_socket, data_dir).delete(f"/v1/entries/{_path_id(entry_id)}")
    emit(output, result, f"Deleted entry {entry_id}")


@entry_group.command("show")
@admin_options
@option("--entry-id", help="Show only this entry.")
@option("--spiffe-id", help="Only entries with this SPIFFE ID.")
@option("--parent-id", help="Only entries with this parent ID.")
@option("--selector", multiple=True, help="Only entries with these selectors (repeatable).")
@output_option
def entry_show(
    admin_socket: str | None,
    data_dir: str,
    entry_id: str | None,
    spiffe_id: str | None,
    parent_id: str | None,
    selector: tuple[str, ...],
    output: str,
) -> None:
    """Show registration entries."""
    client = admin_client(admin_socket, data_dir)
    if entry_id:
        entries = [client.get(f"/v1/entries/{_path_id(entry_id)}")]
    else:
        params: dict[str, Any] = {"selector": list(selector)}
        if spiffe_id:
            params["spiffe_id"] = spiffe_id
        if parent_id:
            params["parent_id"] = parent_id
        entries = client.get("/v1/entries", params=params)["entries"]
    emit_found(output, "entries", entries, ("entry", "entries"), entry_text)


@entry_group.command("count")
@admin_options
@output_option
def entry_count(admin_socket: str | None, data_dir: str, output: str) -> None:
    """Count registration entries."""
    result = admin_client(admin_socket, data_dir).get("/v1/entries/count")
    emit(output, result, f"{result['count']} registration entries")


def _path_id(entry_id: str) -> str:
    if not entry_id or "/" in entry_id or len(entry_id) > 64:
        raise InvalidArgument(f"entry ID {entry_id!r} is not valid; copy it from 'entry show'")
    return entry_id
