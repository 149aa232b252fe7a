"""``tessera server x509 mint``: an X509-SVID minted directly by the server."""

from __future__ import annotations

from pathlib import Path

import click

from ca.commandline import admin_client, admin_options
from sdk.commandline import emit, option, output_option
from sdk.privatefiles import write_file_atomically


@click.group("x509")
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
        write_file_atomically(path, content.encode(), mode=mode)
    return paths
