"""``tessera server ...``: run and operate a trust domain's server (the CA).

CLI.md is the contract for names: every ``spire-server X`` is ``tessera server
X`` with kebab-case flags. Admin commands talk to a running server over its
admin socket (``--admin-socket``, default ``<data-dir>/admin.sock``). The root
group (:mod:`tessera.cli`) mounts :data:`server` when its name is used.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from ca import eventloop
from ca.commandline import (
    DEFAULT_DATA_DIR,
    admin_client,
    admin_options,
    config_file_values,
    config_option,
    emit,
    option,
    output_option,
    progress,
)
from ca.config import server_config
from ca.durations import parse_duration
from ca.errors import InvalidArgument
from ca.federation.cli import federation_group

# -- shared options -------------------------------------------------------------------


def seconds(value: str | None, what: str) -> int:
    if value in (None, ""):
        return 0
    return int(parse_duration(str(value), what=what).total_seconds())


# -- tessera server ---------------------------------------------------------------------


@click.group("server")
def server() -> None:
    """Run and operate a trust domain's server (the CA)."""


server.add_command(federation_group)


@server.command("run")
@config_option
@option("--trust-domain", help="The trust domain, e.g. example.org.")
@option("--data-dir", type=click.Path(file_okay=False), default=DEFAULT_DATA_DIR,
        show_default=True, help="Where the datastore, keys and admin socket live.")
@option("--bind", default="127.0.0.1:8081", show_default=True,
        help="HOST:PORT of the node API that agents call.")
@option("--admin-socket", type=click.Path(dir_okay=False),
        help="The admin API's Unix socket [default: <data-dir>/admin.sock].")
@option("--db", help="SQLAlchemy URL of the datastore [default: SQLite in the data dir].")
@option("--ca-ttl", default="24h", show_default=True, help="Lifetime of each CA key.")
@option("--default-x509-svid-ttl", default="1h", show_default=True,
        help="X509-SVID lifetime for entries without their own.")
@option("--default-jwt-svid-ttl", default="5m", show_default=True,
        help="JWT-SVID lifetime for entries without their own.")
@option("--ca-key-type", type=click.Choice(["ec-p256", "ec-p384", "rsa-2048", "rsa-4096"]),
        default="ec-p256", show_default=True, help="Key type of the X.509 CA.")
@option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
        default="info", show_default=True)
def server_run(**flags: Any) -> None:
    """Run the server: CA, datastore, node API and admin API."""
    # Flags (with env and file defaults already applied by click) win; what is left
    # of the file (plugin tables, or unknown keys that server_config refuses) joins them.
    values = {k: v for k, v in config_file_values().items() if k not in flags}
    values.update({k: v for k, v in flags.items() if v is not None})
    config = server_config(values)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if config.log_level != "debug":  # our own progress lines say where the APIs listen
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from ca.server import Server

    started = time.monotonic()
    progress(f"Starting the Tessera server for trust domain {config.trust_domain.name}")
    progress(f"  data dir:  {config.data_dir.resolve()}")
    progress(f"  datastore: {_redact(config.database_url)}")
    instance = Server(config)
    bundle = instance.authorities.bundle()
    progress(f"  CA ready:  {len(bundle.x509_authorities)} X.509 and "
             f"{len(bundle.jwt_authorities)} JWT authorities in the bundle")

    def ready(s: Any) -> None:
        progress(f"  node API:  https://{config.bind_host}:{config.bind_port}")
        progress(f"  admin API: {config.admin_socket_path.resolve()}")
        progress(f"Server is ready ({time.monotonic() - started:.1f}s). Ctrl-C stops it.")

    eventloop.run(instance.run(on_ready=ready))
    progress("Server stopped.")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url


@server.command("healthcheck")
@admin_options
@output_option
def server_healthcheck(admin_socket: str | None, data_dir: str, output: str) -> None:
    """Exit 0 when the server answers on its admin socket and its datastore is up."""
    health = admin_client(admin_socket, data_dir).get("/v1/health")
    emit(output, health, "Server is healthy.")


# -- token ------------------------------------------------------------------------------


@server.group("token")
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


# -- entry ------------------------------------------------------------------------------


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
    from attestor.workload import WORKLOAD_ATTESTOR_NAMES

    known = sorted(WORKLOAD_ATTESTOR_NAMES)
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


@server.group("entry")
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

    def text() -> str:
        found = f"Found {len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
        return "\n\n".join([found, *(entry_text(e) for e in entries)])

    emit(output, {"entries": entries}, text)


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


# -- agent ------------------------------------------------------------------------------


@server.group("agent")
def agent_group() -> None:
    """Attested agents."""


def agent_text(agent: dict[str, Any]) -> str:
    lines = [
        f"SPIFFE ID         : {agent['spiffe_id']}",
        f"Attestation type  : {agent['attestation_type']}",
        f"Expiration time   : {_time(agent['expires_at'])}",
        f"Serial number     : {agent['serial']}",
        f"Banned            : {str(agent['banned']).lower()}",
    ]
    lines += [f"Selector          : {s['type']}:{s['value']}" for s in agent["selectors"]]
    lines += [f"Alias             : {a}" for a in agent.get("aliases", [])]
    return "\n".join(lines)


def _time(unix: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(unix))


@agent_group.command("list")
@admin_options
@output_option
def agent_list(admin_socket: str | None, data_dir: str, output: str) -> None:
    """List attested agents."""
    agents = admin_client(admin_socket, data_dir).get("/v1/agents")["agents"]

    def text() -> str:
        found = f"Found {len(agents)} attested {'agent' if len(agents) == 1 else 'agents'}"
        return "\n\n".join([found, *(agent_text(a) for a in agents)])

    emit(output, {"agents": agents}, text)


@agent_group.command("count")
@admin_options
@output_option
def agent_count(admin_socket: str | None, data_dir: str, output: str) -> None:
    """Count attested agents."""
    result = admin_client(admin_socket, data_dir).get("/v1/agents/count")
    emit(output, result, f"{result['count']} attested agents")


@agent_group.command("show")
@admin_options
@option("--spiffe-id", required=True, help="The agent's SPIFFE ID.")
@output_option
def agent_show(admin_socket: str | None, data_dir: str, spiffe_id: str, output: str) -> None:
    """Show one attested agent."""
    agent = admin_client(admin_socket, data_dir).get(
        "/v1/agents/show", params={"spiffe_id": spiffe_id}
    )
    emit(output, agent, lambda: agent_text(agent))


def _agent_action(action: str, verb: str, doc: str) -> None:
    @agent_group.command(action, help=doc)
    @admin_options
    @option("--spiffe-id", required=True, help="The agent's SPIFFE ID.")
    @output_option
    def command(admin_socket: str | None, data_dir: str, spiffe_id: str, output: str) -> None:
        result = admin_client(admin_socket, data_dir).post(
            f"/v1/agents/{action}", json={"spiffe_id": spiffe_id}
        )
        emit(output, result, f"Agent {spiffe_id} {verb}.")


_agent_action("evict", "evicted; it must attest again",
              "Forget an agent: it must attest again (a join-token agent needs a new token). "
              "Evicting a banned agent lifts the ban.")
_agent_action("ban", "banned", "Refuse an agent everything, including attesting again.")
_agent_action("unban", "unbanned", "Lift a ban: the agent may attest again.")


# -- bundle -----------------------------------------------------------------------------


FORMAT = click.Choice(["pem", "spiffe"])


@server.group("bundle")
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


# -- x509 / jwt mint --------------------------------------------------------------------


@server.group("x509")
def x509_group() -> None:
    """X509-SVIDs minted directly by the server."""


@x509_group.command("mint")
@admin_options
@option("--spiffe-id", required=True, help="The SPIFFE ID of the SVID.")
@option("--ttl", help="Lifetime (default: the server's X509-SVID TTL).")
@option("--dns", multiple=True, help="A DNS SAN (repeatable).")
@option("--write", type=click.Path(file_okay=False),
        help="Write svid.pem, key.pem (0600) and bundle.pem into this directory.")
@output_option
def x509_mint(
    admin_socket: str | None, data_dir: str, spiffe_id: str, ttl: str | None,
    dns: tuple[str, ...], write: str | None, output: str,
) -> None:
    """Mint an X509-SVID and its private key."""
    body = {"spiffe_id": spiffe_id, "ttl": ttl, "dns_names": list(dns)}
    result = admin_client(admin_socket, data_dir).post("/v1/x509/mint", json=body)
    if write:
        files = write_svid_files(Path(write), result["svid"], result["key"], result["bundle"])
        summary = {k: v for k, v in result.items() if k not in ("key",)}
        summary["files"] = [str(p) for p in files]
        emit(output, summary, lambda: "\n".join(f"Wrote {p}" for p in files))
        return
    emit(output, result, lambda: result["svid"] + result["key"] + result["bundle"])


def write_svid_files(directory: Path, svid: str, key: str, bundle: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "svid.pem", directory / "key.pem", directory / "bundle.pem"]
    for path, content, mode in zip(paths, (svid, key, bundle), (0o644, 0o600, 0o644), strict=True):
        write_file_atomically(path, content.encode(), mode)
    return paths


def write_file_atomically(path: Path, content: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@server.group("jwt")
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


# -- localauthority ---------------------------------------------------------------------


@server.group("localauthority")
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
            f"  Expires at   : {_time(a['expires_at'])}",
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


# -- audit ------------------------------------------------------------------------------


@server.group("audit")
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
