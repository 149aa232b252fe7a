"""The agent's configuration, validated in one place.

Values come from flags, ``TESSERA_*`` environment variables and a TOML file
(``--config agent.toml``), in that order of precedence; the CLI resolves the
precedence and hands the merged mapping to :func:`agent_config`. A key of the
file is a flag's name with ``_`` for ``-``; the Workload API's connection limits
are set in the file only::

    trust_domain = "example.org"
    server = ["tessera-1.internal:8081", "tessera-2.internal:8081"]
    data_dir = "/var/lib/tessera/agent"
    socket = "/run/tessera/agent.sock"
    trust_bundle = "/etc/tessera/bundle.pem"
    health_bind = "127.0.0.1:8088"
    workload_api_idle_timeout = "5m"
    workload_api_max_connections_per_uid = 128
    otlp_endpoint = "127.0.0.1:4317"      # Envoy proxies send their spans here (OTLP/gRPC)
    envoy_access_log = "stdout"           # or "off", or an absolute path on the node

    [workload_attestors.unix]
    hash_binary = true

    config = agent_config(load_config_file(Path("agent.toml")))
    config.socket_path     # PosixPath('/run/tessera/agent.sock')

The Workload API socket defaults to ``$SPIFFE_ENDPOINT_SOCKET``
(``unix:///abs/path``) when it is set, else to ``<data_dir>/agent.sock``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from attestor.node import NODE_ATTESTORS_AGENT
from attestor.plugin import PluginConfig
from attestor.workload import load_workload_attestor
from sdk.address import HostPort
from sdk.durations import parse_duration
from sdk.errors import ConfigError, InvalidArgument
from sdk.spiffeid import TrustDomain, parse_trust_domain
from workload_api.grpc_limits import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS_PER_UID

__all__ = [
    "DEFAULT_HEALTH_BIND",
    "SPIFFE_ENDPOINT_SOCKET",
    "Address",
    "AgentConfig",
    "agent_config",
    "default_socket_path",
    "parse_address",
    "parse_socket",
]

SPIFFE_ENDPOINT_SOCKET: Final = "SPIFFE_ENDPOINT_SOCKET"
DEFAULT_HEALTH_BIND: Final = "127.0.0.1:8088"
SOCKET_NAME: Final = "agent.sock"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

SCALAR_KEYS: Final = frozenset({
    "trust_domain",
    "server",
    "data_dir",
    "socket",
    "join_token",
    "x509pop_cert",
    "x509pop_key",
    "trust_bundle",
    "insecure_bootstrap",
    "health_bind",
    "log_level",
    "workload_api_idle_timeout",
    "workload_api_max_connections_per_uid",
    "otlp_endpoint",
    "envoy_access_log",
})
ENVOY_STDOUT: Final = "/dev/stdout"
TABLE_KEYS: Final = frozenset({"workload_attestors"})


@dataclass(frozen=True)
class Address(HostPort):
    """A ``HOST:PORT`` the agent connects to or listens on (a HostPort with its https URL)."""

    @property
    def https_url(self) -> str:
        return f"https://{self}"


@dataclass(frozen=True)
class AgentConfig:
    trust_domain: TrustDomain
    servers: tuple[Address, ...]
    data_dir: Path
    socket_path: Path
    join_token: str | None = None
    x509pop_cert: Path | None = None
    x509pop_key: Path | None = None
    trust_bundle: Path | None = None
    insecure_bootstrap: bool = False
    health_bind: Address | None = Address("127.0.0.1", 8088)
    """Where ``/live``, ``/ready`` and ``/metrics`` are served; None turns them off."""
    workload_attestors: tuple[PluginConfig, ...] = (PluginConfig("unix"),)
    log_level: str = "info"
    workload_api_idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    """Seconds a Workload API connection with no call in progress is kept open."""
    workload_api_max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    """Workload API connections one uid may have open at once."""
    otlp_endpoint: Address | None = None
    """An OTLP/gRPC collector the node's Envoy proxies send their spans to; None: no
    tracing."""
    envoy_access_log: str | None = ENVOY_STDOUT
    """The file each Envoy proxy writes its JSON access log to (its standard output, which
    the sidecar passes into its log, by default); None: no access log."""

    @property
    def node_attestor(self) -> str | None:
        """``join_token``, ``x509pop``, or None when the agent relies on its stored SVID."""
        if self.join_token:
            return "join_token"
        if self.x509pop_cert:
            return "x509pop"
        return None

    @property
    def node_attestor_plugin(self) -> PluginConfig | None:
        """The agent half the flags name, with its settings; None without one."""
        if self.join_token:
            return PluginConfig("join_token", {"token": self.join_token})
        if self.x509pop_cert and self.x509pop_key:
            return PluginConfig(
                "x509pop", {"cert_path": self.x509pop_cert, "key_path": self.x509pop_key}
            )
        return None


def agent_config(
    values: Mapping[str, Any], *, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Build and validate an AgentConfig from merged flag/env/file values."""
    unknown = set(values) - SCALAR_KEYS - TABLE_KEYS
    if unknown:
        raise ConfigError(
            f"unknown agent setting(s): {', '.join(sorted(unknown))}; "
            "see docs/agent-configuration.md for the settings an agent takes"
        )
    try:
        return _build(values, os.environ if environ is None else environ)
    except InvalidArgument as err:
        raise ConfigError(err.message) from err


def _build(values: Mapping[str, Any], environ: Mapping[str, str]) -> AgentConfig:
    if not values.get("trust_domain"):
        raise ConfigError("the trust domain is not set; pass --trust-domain, e.g. example.org")
    trust_domain = parse_trust_domain(str(values["trust_domain"]))
    servers = _servers(values.get("server"))
    if not values.get("data_dir"):
        raise ConfigError(
            "the data directory is not set; pass --data-dir, e.g. /var/lib/tessera/agent"
        )
    data_dir = Path(str(values["data_dir"])).absolute()
    socket_value = values.get("socket")
    socket_path = (
        parse_socket(str(socket_value), what="--socket")
        if socket_value
        else default_socket_path(data_dir, environ)
    )

    join_token = _text(values, "join_token")
    x509pop_cert = _path(values, "x509pop_cert")
    x509pop_key = _path(values, "x509pop_key")
    if join_token and (x509pop_cert or x509pop_key):
        raise ConfigError(
            "both a join token and an x509pop certificate are given; pass either "
            "--join-token or --x509pop-cert with --x509pop-key, not both"
        )
    if bool(x509pop_cert) != bool(x509pop_key):
        raise ConfigError(
            "x509pop attestation needs both --x509pop-cert and --x509pop-key; "
            "pass the node's certificate and its private key"
        )
    for what, path in (("x509pop certificate", x509pop_cert), ("x509pop key", x509pop_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"the {what} file {path} does not exist; check the path")
    if join_token:  # refuses a malformed token before anything starts
        NODE_ATTESTORS_AGENT.load(PluginConfig("join_token", {"token": join_token}), None)

    trust_bundle = _path(values, "trust_bundle")
    insecure = _flag(values, "insecure_bootstrap")
    if trust_bundle and insecure:
        raise ConfigError(
            "--trust-bundle and --insecure-bootstrap exclude each other; pass only "
            "--trust-bundle to verify the server on first contact"
        )
    if trust_bundle is not None and not trust_bundle.is_file():
        raise ConfigError(
            f"the trust bundle file {trust_bundle} does not exist; save the server's bundle "
            "with 'tessera server bundle show > bundle.pem'"
        )

    log_level = str(values.get("log_level") or "info").lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(
            f"log level {log_level!r} is not one of {', '.join(LOG_LEVELS)}"
        )
    attestors = _workload_attestors(values.get("workload_attestors"))
    for plugin in attestors:
        load_workload_attestor(plugin.name, plugin.settings)  # refuses bad settings now

    return AgentConfig(
        trust_domain=trust_domain,
        servers=servers,
        data_dir=data_dir,
        socket_path=socket_path,
        join_token=join_token,
        x509pop_cert=x509pop_cert,
        x509pop_key=x509pop_key,
        trust_bundle=trust_bundle,
        insecure_bootstrap=insecure,
        health_bind=_health_bind(values.get("health_bind", DEFAULT_HEALTH_BIND)),
        workload_attestors=attestors,
        log_level=log_level,
        workload_api_idle_timeout=_seconds(
            values, "workload_api_idle_timeout", DEFAULT_IDLE_TIMEOUT
        ),
        workload_api_max_connections_per_uid=_positive_count(
            values, "workload_api_max_connections_per_uid", DEFAULT_MAX_CONNECTIONS_PER_UID
        ),
        otlp_endpoint=_otlp_endpoint(values.get("otlp_endpoint")),
        envoy_access_log=_envoy_access_log(values.get("envoy_access_log", "stdout")),
    )


def default_socket_path(data_dir: Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """``$SPIFFE_ENDPOINT_SOCKET`` when set, else ``<data_dir>/agent.sock``."""
    environ = os.environ if environ is None else environ
    endpoint = environ.get(SPIFFE_ENDPOINT_SOCKET)
    if endpoint:
        return parse_socket(endpoint, what=SPIFFE_ENDPOINT_SOCKET)
    if data_dir is None:
        raise ConfigError(
            "no Workload API socket is given; pass --socket PATH, or --data-dir of the agent, "
            "or set SPIFFE_ENDPOINT_SOCKET=unix:///path/to/agent.sock"
        )
    return data_dir.absolute() / SOCKET_NAME


def parse_socket(value: str, *, what: str) -> Path:
    """A socket given as ``unix:///abs/path``, ``unix:/abs/path`` or a plain path."""
    text = value.strip()
    if text.startswith("unix:"):
        rest = text[len("unix:"):]
        if rest.startswith("//"):
            rest = rest[2:]
            if not rest.startswith("/"):
                raise ConfigError(
                    f"{what} {value!r} names a host; write unix:///absolute/path/agent.sock"
                )
        if not rest.startswith("/"):
            raise ConfigError(
                f"{what} {value!r} is not an absolute path; write unix:///absolute/path/agent.sock"
            )
        return Path(rest)
    if "://" in text:
        raise ConfigError(
            f"{what} {value!r} is not a Unix socket; the Tessera agent serves the Workload API "
            "only on a Unix socket: write unix:///absolute/path/agent.sock"
        )
    if not text:
        raise ConfigError(f"{what} is empty; give the path of the Workload API socket")
    return Path(text).absolute()


def parse_address(value: str, *, what: str) -> Address:
    return Address.parse(value, what=what, example="127.0.0.1:8081")


def _servers(raw: Any) -> tuple[Address, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if raw is not None and not isinstance(raw, list | tuple):
        raise ConfigError('server must be a list of addresses, e.g. server = ["127.0.0.1:8081"]')
    addresses = [str(item) for item in raw or () if str(item).strip()]
    if not addresses:
        raise ConfigError(
            "no server address is set; pass --server HOST:PORT (repeat it for several servers)"
        )
    parsed = [parse_address(item, what="server address") for item in addresses]
    return tuple(dict.fromkeys(parsed))


def _workload_attestors(raw: Any) -> tuple[PluginConfig, ...]:
    """``[workload_attestors.<name>]`` tables; the ``unix`` attestor when there are none."""
    if raw is None:
        return (PluginConfig("unix"),)
    if not isinstance(raw, Mapping):
        raise ConfigError(
            "[workload_attestors] must be a table of attestor tables, "
            "e.g. [workload_attestors.unix]"
        )
    plugins = []
    for name, settings in raw.items():
        if not isinstance(settings, Mapping):
            raise ConfigError(f"[workload_attestors.{name}] must be a table of settings")
        plugins.append(PluginConfig(str(name), dict(settings)))
    return tuple(plugins) or (PluginConfig("unix"),)


def _health_bind(raw: Any) -> Address | None:
    text = "" if raw is None else str(raw).strip()
    if text in ("", "0"):
        return None
    try:
        return parse_address(text, what="health bind address")
    except ConfigError:
        raise ConfigError(
            f"health bind address {text!r} is not HOST:PORT, e.g. 127.0.0.1:8088; "
            "use 0 to turn the health endpoints off"
        ) from None


def _otlp_endpoint(raw: Any) -> Address | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, str):
        raise ConfigError(
            f"otlp_endpoint must be HOST:PORT of an OTLP/gRPC collector, e.g. "
            f'"127.0.0.1:4317", got {raw!r}'
        )
    return Address.parse(raw, what="otlp_endpoint", example="127.0.0.1:4317")


def _envoy_access_log(raw: Any) -> str | None:
    """``stdout`` (Envoy's standard output), ``off``, or an absolute path."""
    if raw == "off":
        return None
    if raw == "stdout":
        return ENVOY_STDOUT
    if isinstance(raw, str) and raw.startswith("/") and "\0" not in raw:
        return raw
    raise ConfigError(
        f'envoy_access_log must be "stdout", "off" or an absolute path, not {raw!r}'
    )


def _text(values: Mapping[str, Any], key: str) -> str | None:
    value = values.get(key)
    return str(value).strip() or None if value not in (None, "") else None


def _path(values: Mapping[str, Any], key: str) -> Path | None:
    value = _text(values, key)
    return Path(value).absolute() if value else None


def _seconds(values: Mapping[str, Any], key: str, default: float) -> float:
    value = values.get(key, int(default))
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{key} must be a duration such as 90s, 5m or 1h, got {value!r}")
    return parse_duration(value, what=key).total_seconds()


def _positive_count(values: Mapping[str, Any], key: str, default: int) -> int:
    value = values.get(key, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a whole number of at least 1, got {value!r}")
    return value


def _flag(values: Mapping[str, Any], key: str) -> bool:
    value = values.get(key, False)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("", "0", "false", "no", "off"):
            return False
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value
