"""The agent's configuration: defaults, the socket's default, and the exact refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from attestor.plugin import PluginConfig
from sdk.errors import ConfigError
from workload_api.config import Address, agent_config, default_socket_path, parse_socket

TOKEN = "0123456789abcdef0123456789abcdef"


def values(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "trust_domain": "example.org",
        "server": ["127.0.0.1:8081"],
        "data_dir": str(tmp_path / "agent"),
        "join_token": TOKEN,
        "insecure_bootstrap": True,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def refused(tmp_path: Path, environ: dict[str, str] | None = None, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        agent_config(values(tmp_path, **overrides), environ=environ or {})
    return caught.value.message


def test_defaults(tmp_path: Path) -> None:
    config = agent_config(values(tmp_path), environ={})
    assert config.trust_domain.name == "example.org"
    assert config.servers == (Address("127.0.0.1", 8081),)
    assert config.data_dir == tmp_path / "agent"
    assert config.socket_path == tmp_path / "agent" / "agent.sock"
    assert config.health_bind == Address("127.0.0.1", 8088)
    assert config.workload_attestors == (PluginConfig("unix"),)
    assert config.node_attestor == "join_token"
    assert config.log_level == "info"
    assert config.workload_api_idle_timeout == 300.0
    assert config.workload_api_max_connections_per_uid == 128
    assert config.otlp_endpoint is None


def test_the_socket_defaults_to_spiffe_endpoint_socket(tmp_path: Path) -> None:
    environ = {"SPIFFE_ENDPOINT_SOCKET": "unix:///run/tessera/agent.sock"}
    assert agent_config(values(tmp_path), environ=environ).socket_path == Path(
        "/run/tessera/agent.sock"
    )
    flagged = agent_config(values(tmp_path, socket="/tmp/other.sock"), environ=environ)
    assert flagged.socket_path == Path("/tmp/other.sock")


def test_default_socket_path_without_anything_says_what_to_pass() -> None:
    with pytest.raises(ConfigError) as caught:
        default_socket_path(None, {})
    assert caught.value.message == (
        "no Workload API socket is given; pass --socket PATH, or --data-dir of the agent, "
        "or set SPIFFE_ENDPOINT_SOCKET=unix:///path/to/agent.sock"
    )
    assert default_socket_path(Path("/var/lib/a"), {}) == Path("/var/lib/a/agent.sock")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("unix:///run/agent.sock", "/run/agent.sock"),
        ("unix:/run/agent.sock", "/run/agent.sock"),
        ("/run/agent.sock", "/run/agent.sock"),
    ],
)
def test_socket_forms(given: str, expected: str) -> None:
    assert parse_socket(given, what="--socket") == Path(expected)


def test_a_relative_socket_path_is_made_absolute() -> None:
    assert parse_socket("agent.sock", what="--socket") == Path.cwd() / "agent.sock"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("tcp://127.0.0.1:9000", "SPIFFE_ENDPOINT_SOCKET 'tcp://127.0.0.1:9000' is not a Unix "
         "socket; the Tessera agent serves the Workload API only on a Unix socket: write "
         "unix:///absolute/path/agent.sock"),
        ("unix:agent.sock", "SPIFFE_ENDPOINT_SOCKET 'unix:agent.sock' is not an absolute path; "
         "write unix:///absolute/path/agent.sock"),
        ("unix://host/agent.sock", "SPIFFE_ENDPOINT_SOCKET 'unix://host/agent.sock' names a "
         "host; write unix:///absolute/path/agent.sock"),
    ],
)
def test_bad_endpoint_sockets(tmp_path: Path, given: str, message: str) -> None:
    assert refused(tmp_path, environ={"SPIFFE_ENDPOINT_SOCKET": given}) == message


def test_several_servers_keep_their_order(tmp_path: Path) -> None:
    config = agent_config(
        values(tmp_path, server=["b.internal:8081", "a.internal:8082", "b.internal:8081"]),
        environ={},
    )
    assert [str(s) for s in config.servers] == ["b.internal:8081", "a.internal:8082"]
    single = agent_config(values(tmp_path, server="[::1]:8081"), environ={})
    assert single.servers == (Address("::1", 8081),)
    assert single.servers[0].https_url == "https://[::1]:8081"


@pytest.mark.parametrize("health_bind", ["0", ""])
def test_health_endpoints_can_be_turned_off(tmp_path: Path, health_bind: str) -> None:
    assert agent_config(values(tmp_path, health_bind=health_bind), environ={}).health_bind is None


def test_workload_attestor_tables(tmp_path: Path) -> None:
    config = agent_config(
        values(tmp_path, workload_attestors={"unix": {"hash_binary": False}}), environ={}
    )
    assert config.workload_attestors == (PluginConfig("unix", {"hash_binary": False}),)


def test_x509pop_needs_both_files(tmp_path: Path) -> None:
    cert = tmp_path / "node.pem"
    key = tmp_path / "node.key"
    cert.write_text("cert")
    key.write_text("key")
    config = agent_config(
        values(tmp_path, join_token=None, x509pop_cert=str(cert), x509pop_key=str(key)),
        environ={},
    )
    assert config.node_attestor == "x509pop"
    assert config.x509pop_cert == cert


def test_no_node_attestor_is_allowed_for_an_agent_that_attested_before(tmp_path: Path) -> None:
    assert agent_config(values(tmp_path, join_token=None), environ={}).node_attestor is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"trust_domain": None},
         "the trust domain is not set; pass --trust-domain, e.g. example.org"),
        ({"trust_domain": "Example.org"},
         "trust domain 'Example.org' is not valid: trust domain must be lower case; use "
         "lower-case letters, digits, '.', '-' and '_', e.g. example.org"),
        ({"server": []},
         "no server address is set; pass --server HOST:PORT (repeat it for several servers)"),
        ({"server": ["localhost"]},
         "server address 'localhost' is not HOST:PORT, e.g. 127.0.0.1:8081"),
        ({"server": ["::1:8081"]},
         "server address '::1:8081' is not HOST:PORT, e.g. 127.0.0.1:8081"),
        ({"server": 8081},
         'server must be a list of addresses, e.g. server = ["127.0.0.1:8081"]'),
        ({"data_dir": None},
         "the data directory is not set; pass --data-dir, e.g. /var/lib/tessera/agent"),
        ({"join_token": "short"},
         "join token is malformed; copy it exactly as 'tessera server token generate' printed it"),
        ({"x509pop_cert": "/nonexistent/node.pem"},
         "both a join token and an x509pop certificate are given; pass either --join-token or "
         "--x509pop-cert with --x509pop-key, not both"),
        ({"join_token": None, "x509pop_cert": "/nonexistent/node.pem"},
         "x509pop attestation needs both --x509pop-cert and --x509pop-key; pass the node's "
         "certificate and its private key"),
        ({"join_token": None, "x509pop_cert": "/nonexistent/node.pem",
          "x509pop_key": "/nonexistent/node.key"},
         "the x509pop certificate file /nonexistent/node.pem does not exist; check the path"),
        ({"trust_bundle": "/nonexistent/bundle.pem"},
         "--trust-bundle and --insecure-bootstrap exclude each other; pass only --trust-bundle "
         "to verify the server on first contact"),
        ({"trust_bundle": "/nonexistent/bundle.pem", "insecure_bootstrap": False},
         "the trust bundle file /nonexistent/bundle.pem does not exist; save the server's bundle "
         "with 'tessera server bundle show > bundle.pem'"),
        ({"insecure_bootstrap": "maybe"}, "insecure_bootstrap must be true or false, got 'maybe'"),
        ({"health_bind": "8088"},
         "health bind address '8088' is not HOST:PORT, e.g. 127.0.0.1:8088; use 0 to turn the "
         "health endpoints off"),
        ({"log_level": "loud"}, "log level 'loud' is not one of debug, info, warning, error"),
        ({"workload_attestors": {"podman": {}}},
         "unknown workload attestor 'podman'; "
         "known workload attestors: docker, k8s, systemd, unix"),
        ({"workload_attestors": {"unix": {"hash": True}}},
         "[workload_attestors.unix] hash: unknown setting; known settings: "
         "discover_workload_path, hash_binary, max_binary_size"),
        ({"workload_attestors": "unix"},
         "[workload_attestors] must be a table of attestor tables, e.g. [workload_attestors.unix]"),
        ({"workload_api_idle_timeout": "soon"},
         "workload_api_idle_timeout 'soon' is not a duration; write seconds or a number with "
         "s, m, h or d, e.g. 90s, 15m, 1h, 24h"),
        ({"workload_api_idle_timeout": 0}, "workload_api_idle_timeout must be greater than zero"),
        ({"workload_api_idle_timeout": 0.5},
         "workload_api_idle_timeout must be a duration such as 90s, 5m or 1h, got 0.5"),
        ({"workload_api_max_connections_per_uid": 0},
         "workload_api_max_connections_per_uid must be a whole number of at least 1, got 0"),
        ({"workload_api_max_connections_per_uid": "many"},
         "workload_api_max_connections_per_uid must be a whole number of at least 1, "
         "got 'many'"),
        ({"otlp_endpoint": "http://127.0.0.1:4317"},
         "otlp_endpoint 'http://127.0.0.1:4317' is not HOST:PORT, e.g. 127.0.0.1:4317"),
        ({"otlp_endpoint": 4317},
         'otlp_endpoint must be HOST:PORT of an OTLP/gRPC collector, e.g. "127.0.0.1:4317", '
         "got 4317"),
        ({"bind": "127.0.0.1:1"},
         "unknown agent setting(s): bind; see docs/agent-configuration.md for the settings an "
         "agent takes"),
    ],
)
def test_refusals(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    assert refused(tmp_path, **overrides) == message


def test_workload_api_connection_limits(tmp_path: Path) -> None:
    config = agent_config(
        values(tmp_path, workload_api_idle_timeout="2m", workload_api_max_connections_per_uid=16),
        environ={},
    )
    assert config.workload_api_idle_timeout == 120.0
    assert config.workload_api_max_connections_per_uid == 16


@pytest.mark.parametrize(("given", "expected"), [
    ("127.0.0.1:4317", Address("127.0.0.1", 4317)),
    (" otel.internal:4317 ", Address("otel.internal", 4317)),
    ("[::1]:4317", Address("::1", 4317)),
    ("", None),
])  # fmt: skip
def test_the_otlp_endpoint(tmp_path: Path, given: str, expected: Address | None) -> None:
    config = agent_config(values(tmp_path, otlp_endpoint=given), environ={})
    assert config.otlp_endpoint == expected


@pytest.mark.parametrize(("given", "expected"), [
    ("stdout", "/dev/stdout"),
    ("off", None),
    ("/var/log/tessera/envoy-access.log", "/var/log/tessera/envoy-access.log"),
])  # fmt: skip
def test_the_envoy_access_log(tmp_path: Path, given: str, expected: str | None) -> None:
    config = agent_config(values(tmp_path, envoy_access_log=given), environ={})
    assert config.envoy_access_log == expected
    assert agent_config(values(tmp_path), environ={}).envoy_access_log == "/dev/stdout"


@pytest.mark.parametrize("given", ["relative.log", "", 1, "on"])
def test_an_envoy_access_log_that_is_no_file_is_refused(tmp_path: Path, given: object) -> None:
    with pytest.raises(ConfigError, match='envoy_access_log must be "stdout", "off" or an '
                                          "absolute path"):  # fmt: skip
        agent_config(values(tmp_path, envoy_access_log=given), environ={})
