"""``tessera server run``: the server itself (CA, datastore, node API, admin API)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import click

from ca.commandline import DEFAULT_DATA_DIR
from ca.config import server_config
from sdk import eventloop
from sdk.commandline import config_file_values, config_option, option, progress


@click.command("run")
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
@option("--request-timeout", default="10s", show_default=True,
        help="Time a client has to send a whole request (TLS handshake included).")
@option("--idle-timeout", default="5s", show_default=True,
        help="How long an idle kept-alive connection stays open (at least 5s).")
@option("--max-connections", type=click.IntRange(min=1), default=1024, show_default=True,
        help="Open connections each listener accepts.")
@option("--max-connections-per-peer", type=click.IntRange(min=1), default=64,
        show_default=True, help="Open connections accepted from one IP address.")
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
        progress(f"  node API:  https://{config.bind_host}:{s.node_api_port}")
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
