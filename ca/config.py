"""The server's configuration, validated in one place.

Values come from flags, ``TESSERA_*`` environment variables and a TOML file
(``--config server.toml``), in that order of precedence; the CLI resolves the
precedence and hands the merged mapping to :func:`server_config`. A file looks
like this (every key is a flag's name with ``_`` for ``-``)::

    trust_domain = "example.org"
    data_dir = "/var/lib/tessera"
    bind = "127.0.0.1:8081"
    db = "postgresql+psycopg://tessera@db/tessera"
    ca_ttl = "24h"

    [key_manager.disk]
    kek_file = "/etc/tessera/kek"

    [upstream_authority.disk]
    cert_file_path = "/etc/tessera/root.pem"
    key_file_path = "/etc/tessera/root.key"

    [federation.bundle_endpoint]          # serve this trust domain's bundle to others
    address = "0.0.0.0:8443"
    profile = "https_spiffe"              # or "https_web" with cert_file and key_file

The listeners' limits (``request_timeout``, ``idle_timeout``, ``max_connections``,
``max_connections_per_peer``) are top-level keys too; :class:`ConnectionLimits`
says what each bounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attestor.plugin import PluginConfig as PluginConfig  # noqa: PLC0414 -- re-exported
from ca.tombstones import DEFAULT_TOMBSTONE_RETENTION
from sdk.address import HostPort
from sdk.commandline import (  # noqa: F401  (moved; re-exported for the old path)
    ConfigFileUnreadable,
    load_config_file,
)
from sdk.durations import format_duration, parse_duration
from sdk.errors import ConfigError, InvalidArgument
from sdk.keys import KeyType, parse_key_type
from sdk.spiffeid import parse_trust_domain

if TYPE_CHECKING:
    from sdk.spiffeid import TrustDomain

DEFAULT_BIND = "127.0.0.1:8081"
DEFAULT_CA_TTL = timedelta(hours=24)
DEFAULT_X509_SVID_TTL = timedelta(hours=1)
DEFAULT_JWT_SVID_TTL = timedelta(minutes=5)
DEFAULT_JOIN_TOKEN_TTL = timedelta(seconds=600)
DEFAULT_SERVER_LEASE_TTL = timedelta(seconds=15)
MIN_SERVER_LEASE_TTL = timedelta(seconds=3)
DEFAULT_MESH_INSTANCE_LEASE = timedelta(seconds=30)
MIN_MESH_INSTANCE_LEASE = timedelta(seconds=3)
DEFAULT_REQUEST_TIMEOUT = timedelta(seconds=10)
DEFAULT_IDLE_TIMEOUT = timedelta(seconds=5)
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_CONNECTIONS_PER_PEER = 64
MIN_IDLE_TIMEOUT = timedelta(seconds=5)
"""Agents drop a pooled connection after 4 s idle; the server must not drop it first."""

SCALAR_KEYS = {
    "trust_domain",
    "data_dir",
    "bind",
    "admin_socket",
    "db",
    "ca_ttl",
    "default_x509_svid_ttl",
    "default_jwt_svid_ttl",
    "ca_key_type",
    "jwt_key_type",
    "log_level",
    "server_lease_ttl",
    "tombstone_retention",
    "mesh_instance_lease",
    "request_timeout",
    "idle_timeout",
    "max_connections",
    "max_connections_per_peer",
}
PLUGIN_KEYS = {"key_manager", "upstream_authority", "node_attestors"}
TABLE_KEYS = {"federation"}

BUNDLE_ENDPOINT_PROFILES = ("https_spiffe", "https_web")
BUNDLE_ENDPOINT_KEYS = ("address", "profile", "cert_file", "key_file")


@dataclass(frozen=True)
class BundleEndpointConfig:
    """Where and how this server serves its trust bundle to other trust domains.

    ``https_spiffe`` serves it with the server's own SVID; ``https_web`` with the
    web PKI certificate in ``cert_file`` / ``key_file``.
    """

    host: str
    port: int
    profile: str = "https_spiffe"
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client may hold of a listener (node API, bundle endpoint, admin socket).

    ``request_timeout`` bounds the time from accepting a connection (TLS handshake
    included) to the end of its first request's body, and from the first byte of a
    later request to the end of its body; ``idle_timeout`` bounds the quiet time
    between requests on a kept-alive connection. ``max_connections`` caps the open
    connections of each listener, ``max_connections_per_peer`` those from one IP
    address (not applied on the Unix socket, whose callers have no address).
    """

    request_timeout: timedelta = DEFAULT_REQUEST_TIMEOUT
    idle_timeout: timedelta = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER


@dataclass(frozen=True)
class FederationConfig:
    bundle_endpoint: BundleEndpointConfig | None = None


@dataclass(frozen=True)
class ServerConfig:
    trust_domain: TrustDomain
    data_dir: Path
    bind_host: str = "127.0.0.1"
    bind_port: int = 8081
    admin_socket: Path | None = None
    db_url: str | None = None
    ca_ttl: timedelta = DEFAULT_CA_TTL
    default_x509_svid_ttl: timedelta = DEFAULT_X509_SVID_TTL
    default_jwt_svid_ttl: timedelta = DEFAULT_JWT_SVID_TTL
    ca_key_type: KeyType = KeyType.EC_P256
    jwt_key_type: KeyType | None = None
    """None: the CA's key type (see :attr:`jwt_authority_key_type`)."""
    key_manager: PluginConfig = PluginConfig("disk")
    upstream_authority: PluginConfig | None = None
    node_attestors: tuple[PluginConfig, ...] = (PluginConfig("join_token"),)
    log_level: str = "info"
    federation: FederationConfig = FederationConfig()
    server_lease_ttl: timedelta = DEFAULT_SERVER_LEASE_TTL
    tombstone_retention: timedelta = DEFAULT_TOMBSTONE_RETENTION
    """How long a deleted entry's tombstone is kept (see :mod:`ca.tombstones`)."""
    mesh_instance_lease: timedelta = DEFAULT_MESH_INSTANCE_LEASE
    """How long the instances an agent registered outlive its last report; agents
    report at a third of it."""

    @property
    def jwt_authority_key_type(self) -> KeyType:
        """The JWT authority's key type: ``jwt_key_type`` when set, else the CA's, as with
        SPIRE (``rsa-2048`` signs RS256 JWT-SVIDs, ``ec-p384`` ES384, ``ec-p256`` ES256)."""
        return self.jwt_key_type or self.ca_key_type
    limits: ConnectionLimits = ConnectionLimits()

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.data_dir / "admin.sock"

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir.resolve()}/datastore.sqlite3"


def server_config(values: Mapping[str, Any]) -> ServerConfig:
    """Build and validate a ServerConfig from merged flag/env/file values."""
    unknown = set(values) - SCALAR_KEYS - PLUGIN_KEYS - TABLE_KEYS
    if unknown:
        raise ConfigError(
            f"unknown server setting(s): {', '.join(sorted(unknown))}; "
            "see docs/server-configuration.md for the settings a server takes"
        )
    try:
        return _build(values)
    except InvalidArgument as err:
        raise ConfigError(err.message) from err


def _build(values: Mapping[str, Any]) -> ServerConfig:
    if not values.get("trust_domain"):
        raise ConfigError("the trust domain is not set; pass --trust-domain, e.g. example.org")
    if not values.get("data_dir"):
        raise ConfigError("the data directory is not set; pass --data-dir, e.g. .tessera")
    bind = parse_bind(str(values.get("bind") or DEFAULT_BIND))
    key_manager = _single_plugin(values.get("key_manager"), "key_manager") or PluginConfig("disk")
    upstream = _single_plugin(values.get("upstream_authority"), "upstream_authority")
    attestors = _plugins(values.get("node_attestors"), "node_attestors")
    admin_socket = values.get("admin_socket")
    config = ServerConfig(
        trust_domain=parse_trust_domain(str(values["trust_domain"])),
        data_dir=Path(str(values["data_dir"])),
        bind_host=bind.host,
        bind_port=bind.port,
        admin_socket=Path(str(admin_socket)) if admin_socket else None,
        db_url=str(values["db"]) if values.get("db") else None,
        ca_ttl=_duration(values, "ca_ttl", DEFAULT_CA_TTL),
        default_x509_svid_ttl=_duration(values, "default_x509_svid_ttl", DEFAULT_X509_SVID_TTL),
        default_jwt_svid_ttl=_duration(values, "default_jwt_svid_ttl", DEFAULT_JWT_SVID_TTL),
        ca_key_type=parse_key_type(str(values.get("ca_key_type") or KeyType.EC_P256)),
        jwt_key_type=(
            parse_key_type(str(values["jwt_key_type"])) if values.get("jwt_key_type") else None
        ),
        key_manager=key_manager,
        upstream_authority=upstream,
        node_attestors=attestors or (PluginConfig("join_token"),),
        log_level=str(values.get("log_level") or "info"),
        federation=_federation(values.get("federation")),
        server_lease_ttl=_duration(values, "server_lease_ttl", DEFAULT_SERVER_LEASE_TTL),
        tombstone_retention=_duration(
            values, "tombstone_retention", DEFAULT_TOMBSTONE_RETENTION
        ),
        mesh_instance_lease=_duration(
            values, "mesh_instance_lease", DEFAULT_MESH_INSTANCE_LEASE
        ),
        limits=_limits(values),
    )
    if config.mesh_instance_lease < MIN_MESH_INSTANCE_LEASE:
        raise ConfigError(
            f"mesh_instance_lease ({format_duration(config.mesh_instance_lease)}) is shorter "
            f"than {format_duration(MIN_MESH_INSTANCE_LEASE)}; agents report at a third of "
            "it, so give them a few seconds"
        )
    if config.server_lease_ttl < MIN_SERVER_LEASE_TTL:
        raise ConfigError(
            f"server-lease-ttl ({format_duration(config.server_lease_ttl)}) is shorter than "
            f"{format_duration(MIN_SERVER_LEASE_TTL)}; the server renews its lease every "
            "second, so give it a few seconds"
        )
    endpoint = config.federation.bundle_endpoint
    if endpoint is not None and (endpoint.host, endpoint.port) == (bind.host, bind.port):
        raise ConfigError(
            f"the bundle endpoint and the node API both listen on {bind}; "
            "give [federation.bundle_endpoint] address a port of its own"
        )
    if config.default_x509_svid_ttl > config.ca_ttl:
        raise ConfigError(
            f"the default X509-SVID TTL ({format_duration(config.default_x509_svid_ttl)}) is "
            f"longer than the CA TTL ({format_duration(config.ca_ttl)}); SVIDs cannot outlive "
            "their CA"
        )
    return config


def parse_bind(value: str) -> HostPort:
    """Where to listen: ``HOST:PORT``, ``[IPV6]:PORT``; port 0 takes any free port."""
    return HostPort.parse(value, what="bind address", example="127.0.0.1:8081", any_port=True)


def _duration(values: Mapping[str, Any], key: str, default: timedelta) -> timedelta:
    raw = values.get(key)
    if raw is None or raw == "":
        return default
    what = key.replace("_", "-")
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise ConfigError(
            f"{what} {raw!r} is not a duration; write a string such as \"90s\", \"15m\" or \"1h\""
        )
    return parse_duration(raw, what=what)


def _limits(values: Mapping[str, Any]) -> ConnectionLimits:
    idle = _duration(values, "idle_timeout", DEFAULT_IDLE_TIMEOUT)
    if idle < MIN_IDLE_TIMEOUT:
        raise ConfigError(
            f"idle-timeout {format_duration(idle)} is too short: agents keep an idle "
            f"connection for 4s, so it must be at least {format_duration(MIN_IDLE_TIMEOUT)}"
        )
    return ConnectionLimits(
        request_timeout=_duration(values, "request_timeout", DEFAULT_REQUEST_TIMEOUT),
        idle_timeout=idle,
        max_connections=_count(values, "max_connections", DEFAULT_MAX_CONNECTIONS),
        max_connections_per_peer=_count(
            values, "max_connections_per_peer", DEFAULT_MAX_CONNECTIONS_PER_PEER
        ),
    )


def _count(values: Mapping[str, Any], key: str, default: int) -> int:
    raw = values.get(key)
    if raw is None or raw == "":
        return default
    what = key.replace("_", "-")
    try:
        count = int(raw) if not isinstance(raw, bool | float) else None
    except ValueError:
        count = None
    if count is None or count < 1:
        raise ConfigError(f"{what} {raw!r} is not a whole number of connections of 1 or more")
    return count


def _federation(raw: Any) -> FederationConfig:
    if raw is None:
        return FederationConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError(
            "[federation] must be a table, e.g. [federation.bundle_endpoint] with an address"
        )
    unknown = set(raw) - {"bundle_endpoint"}
    if unknown:
        raise ConfigError(
            f"unknown [federation] setting(s): {', '.join(sorted(unknown))}; it takes "
            "[federation.bundle_endpoint] (relationships are made with "
            "'tessera server federation create')"
        )
    endpoint = raw.get("bundle_endpoint")
    return FederationConfig(_bundle_endpoint(endpoint) if endpoint is not None else None)


def _bundle_endpoint(raw: Any) -> BundleEndpointConfig:
    where = "[federation.bundle_endpoint]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table of settings, e.g. address = \"0.0.0.0:8443\"")
    unknown = set(raw) - set(BUNDLE_ENDPOINT_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown {where} setting(s): {', '.join(sorted(unknown))}; it takes "
            "address, profile, cert_file and key_file"
        )
    address = raw.get("address")
    if not isinstance(address, str) or not address:
        raise ConfigError(f"{where} needs an address, e.g. address = \"0.0.0.0:8443\"")
    listen = HostPort.parse(
        address, what=f"{where} address", example='"0.0.0.0:8443"', any_port=True
    )
    profile = raw.get("profile", "https_spiffe")
    if profile not in BUNDLE_ENDPOINT_PROFILES:
        raise ConfigError(
            f"{where} profile {profile!r} is not one of https_spiffe (serve with the "
            "server's SVID) or https_web (serve with cert_file and key_file)"
        )
    files = {name: raw.get(name) for name in ("cert_file", "key_file")}
    for name, value in files.items():
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where} {name} must be a file path")
    if profile == "https_spiffe":
        given = [name for name, value in files.items() if value is not None]
        if given:
            raise ConfigError(
                f"{where} {' and '.join(given)} {'is' if len(given) == 1 else 'are'} only "
                "for profile https_web; with "
                "https_spiffe the endpoint serves the server's own SVID, so remove them"
            )
        return BundleEndpointConfig(host=listen.host, port=listen.port, profile=profile)
    missing = [name for name, value in files.items() if value is None]
    if missing:
        raise ConfigError(
            f"{where} profile https_web needs {' and '.join(missing)}: the web PKI "
            "certificate (with its chain) and private key the endpoint serves with"
        )
    return BundleEndpointConfig(
        host=listen.host,
        port=listen.port,
        profile=profile,
        cert_file=Path(str(files["cert_file"])),
        key_file=Path(str(files["key_file"])),
    )


def _single_plugin(raw: Any, key: str) -> PluginConfig | None:
    plugins = _plugins(raw, key)
    if len(plugins) > 1:
        raise ConfigError(f"[{key}] names {len(plugins)} plugins; configure exactly one")
    return plugins[0] if plugins else None


def _plugins(raw: Any, key: str) -> tuple[PluginConfig, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (PluginConfig(raw),)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{key}] must be a table of plugin tables, e.g. [{key}.disk]")
    plugins = []
    for name, settings in raw.items():
        if not isinstance(settings, Mapping):
            raise ConfigError(f"[{key}.{name}] must be a table of settings")
        plugins.append(PluginConfig(str(name), dict(settings)))
    return tuple(plugins)
