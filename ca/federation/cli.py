"""``tessera server federation ...``: federation relationships with other trust domains.

    tessera server federation create --trust-domain partner.org \\
        --bundle-endpoint-url https://partner.example:8443 \\
        --bundle-endpoint-profile https_spiffe \\
        --endpoint-spiffe-id spiffe://partner.org/tessera/server \\
        --trust-domain-bundle-path partner.bundle.json
    tessera server federation list | show --trust-domain partner.org
    tessera server federation update --trust-domain partner.org --bundle-endpoint-url URL
    tessera server federation refresh --trust-domain partner.org
    tessera server federation delete --trust-domain partner.org

Thin clients of the admin API's ``/v1/federation`` endpoints
(:mod:`ca.federation.api`); :mod:`ca.cli` mounts :data:`federation_group` under
``tessera server`` when its name is used. Like every noun in :mod:`ca.cli`, it
depends on :mod:`ca.commandline` and :mod:`ca.cli.common`, never on the groups
that mount it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from ca.cli.common import emit_found
from ca.commandline import admin_client, admin_options
from sdk.commandline import emit, option, output_option
from sdk.errors import InvalidArgument
from sdk.spiffeid import parse_trust_domain

PROFILES = click.Choice(["https_web", "https_spiffe"])
RELATIONSHIPS = "/v1/federation/relationships"


def _trust_domain_option(f: Any) -> Any:
    return option(
        "--trust-domain", required=True, help="The federated trust domain, e.g. partner.org."
    )(f)


def _path(trust_domain: str) -> str:
    return f"{RELATIONSHIPS}/{parse_trust_domain(trust_domain).name}"


def _relationship_flags(f: Any) -> Any:
    for decorator in reversed([
        option("--bundle-endpoint-url", help="HTTPS URL of the trust domain's bundle endpoint."),
        option("--bundle-endpoint-profile", type=PROFILES,
               help="https_web (web PKI certificate) or https_spiffe (the server's SVID)."),
        option("--endpoint-spiffe-id",
               help="https_spiffe: the SPIFFE ID the endpoint's certificate must carry, "
                    "e.g. spiffe://partner.org/tessera/server."),
        option("--trust-domain-bundle-path", type=click.Path(dir_okay=False, allow_dash=True),
               help="The trust domain's current bundle, PEM or SPIFFE JSON ('-' reads "
                    "stdin); needed the first time for https_spiffe."),
    ]):
        f = decorator(f)
    return f


def _read_bundle(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgument(
            f"cannot read the bundle file {path}: {getattr(err, 'strerror', None) or err}"
        ) from err


def _time(unix: int | None) -> str:
    if unix is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(unix))


def relationship_text(relationship: dict[str, Any]) -> str:
    lines = [
        f"Trust domain            : {relationship['trust_domain']}",
        f"Bundle endpoint URL     : {relationship['bundle_endpoint_url']}",
        f"Bundle endpoint profile : {relationship['bundle_endpoint_profile']}",
    ]
    if relationship["endpoint_spiffe_id"]:
        lines.append(f"Endpoint SPIFFE ID      : {relationship['endpoint_spiffe_id']}")
    bundle = relationship["bundle"]
    if bundle is None:
        lines.append("Bundle                  : none stored yet")
    else:
        lines.append(
            f"Bundle                  : sequence {bundle['spiffe_sequence']}, "
            f"{bundle['x509_authorities']} X.509 and {bundle['jwt_authorities']} JWT "
            f"authorities, refresh hint {bundle['refresh_hint']}s"
        )
    lines.append(f"Last refresh            : {_time(relationship['last_refresh_at'])}")
    if relationship["last_error"]:
        lines.append(f"Last error              : {relationship['last_error']}")
    return "\n".join(lines)


@click.group("federation")
def federation_group() -> None:
    """Federation relationships: trust domains whose bundles this one fetches and trusts."""


@federation_group.command("create")
@admin_options
@_trust_domain_option
@_relationship_flags
@output_option
def federation_create(
    admin_socket: str | None, data_dir: str, trust_domain: str, output: str, **flags: Any
) -> None:
    """Federate with a trust domain: fetch and trust the bundle its endpoint serves."""
    missing = [f"--{name.replace('_', '-')}" for name in
               ("bundle_endpoint_url", "bundle_endpoint_profile") if not flags.get(name)]
    if missing:
        raise InvalidArgument(f"{' and '.join(missing)} must be given to create a relationship")
    body = {
        "trust_domain": trust_domain,
        "bundle_endpoint_url": flags["bundle_endpoint_url"],
        "bundle_endpoint_profile": flags["bundle_endpoint_profile"],
        "endpoint_spiffe_id": flags.get("endpoint_spiffe_id"),
        "trust_domain_bundle": _read_bundle(flags.get("trust_domain_bundle_path")),
    }
    created = admin_client(admin_socket, data_dir).post(RELATIONSHIPS, json=body)
    emit(output, created, lambda: relationship_text(created))


@federation_group.command("update")
@admin_options
@_trust_domain_option
@_relationship_flags
@output_option
def federation_update(
    admin_socket: str | None, data_dir: str, trust_domain: str, output: str, **flags: Any
) -> None:
    """Change a relationship; settings not given keep their values."""
    client = admin_client(admin_socket, data_dir)
    current = client.get(_path(trust_domain))
    profile = flags.get("bundle_endpoint_profile") or current["bundle_endpoint_profile"]
    endpoint_id = flags.get("endpoint_spiffe_id")
    if endpoint_id is None and profile == current["bundle_endpoint_profile"]:
        endpoint_id = current["endpoint_spiffe_id"]
    body = {
        "trust_domain": current["trust_domain"],
        "bundle_endpoint_url": flags.get("bundle_endpoint_url")
        or current["bundle_endpoint_url"],
        "bundle_endpoint_profile": profile,
        "endpoint_spiffe_id": endpoint_id,
        "trust_domain_bundle": _read_bundle(flags.get("trust_domain_bundle_path")),
    }
    updated = client.put(_path(trust_domain), json=body)
    emit(output, updated, lambda: relationship_text(updated))


@federation_group.command("list")
@admin_options
@output_option
def federation_list(admin_socket: str | None, data_dir: str, output: str) -> None:
    """List the federation relationships."""
    relationships = admin_client(admin_socket, data_dir).get(RELATIONSHIPS)["relationships"]
    emit_found(
        output, "relationships", relationships,
        ("federation relationship", "federation relationships"), relationship_text,
    )


@federation_group.command("show")
@admin_options
@_trust_domain_option
@output_option
def federation_show(admin_socket: str | None, data_dir: str, trust_domain: str,
                    output: str) -> None:
    """Show one relationship, its stored bundle and how the last refresh went."""
    relationship = admin_client(admin_socket, data_dir).get(_path(trust_domain))
    emit(output, relationship, lambda: relationship_text(relationship))


@federation_group.command("delete")
@admin_options
@_trust_domain_option
@output_option
def federation_delete(admin_socket: str | None, data_dir: str, trust_domain: str,
                      output: str) -> None:
    """Stop federating: delete the relationship AND the trust domain's stored bundle,
    so workloads stop trusting it."""
    result = admin_client(admin_socket, data_dir).delete(_path(trust_domain))
    emit(output, result, f"Deleted the federation relationship with {result['trust_domain']} "
                         "and its federated bundle.")


@federation_group.command("refresh")
@admin_options
@_trust_domain_option
@output_option
def federation_refresh(admin_socket: str | None, data_dir: str, trust_domain: str,
                       output: str) -> None:
    """Fetch the trust domain's bundle from its endpoint now; exit 1 saying why if it fails."""
    result = admin_client(admin_socket, data_dir).post(f"{_path(trust_domain)}/refresh")

    def text() -> str:
        bundle = result["bundle"]
        what = "stored its new authorities" if result["changed"] else "no new authorities"
        return (
            f"Refreshed the bundle of {result['trust_domain']} from "
            f"{result['bundle_endpoint_url']}: sequence {bundle['spiffe_sequence']}, "
            f"{bundle['x509_authorities']} X.509 and {bundle['jwt_authorities']} JWT "
            f"authorities ({what})."
        )

    emit(output, result, text)
