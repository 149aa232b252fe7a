"""server_config: the one place the server's settings are validated, with exact messages."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ca.config import ConnectionLimits, PluginConfig, server_config
from sdk.commandline import load_config_file
from sdk.errors import ConfigError
from sdk.keys import KeyType

DURATION_HINT = "write seconds or a number with s, m, h or d, e.g. 90s, 15m, 1h, 24h"


def config(**values: Any) -> Any:
    return server_config({"trust_domain": "example.org", "data_dir": "/var/lib/tessera", **values})


def refusal(values: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as refused:
        server_config(values)
    return refused.value.message


def refusal_of(**values: Any) -> str:
    return refusal({"trust_domain": "example.org", "data_dir": "/var/lib/tessera", **values})


def test_defaults():
    built = config()

    assert built.trust_domain.name == "example.org"
    assert built.data_dir == Path("/var/lib/tessera")
    assert (built.bind_host, built.bind_port) == ("127.0.0.1", 8081)
    assert built.admin_socket_path == Path("/var/lib/tessera/admin.sock")
    resolved = Path("/var/lib/tessera").resolve()
    assert built.database_url == f"sqlite:///{resolved}/datastore.sqlite3"
    assert built.ca_ttl == timedelta(hours=24)
    assert built.default_x509_svid_ttl == timedelta(hours=1)
    assert built.default_jwt_svid_ttl == timedelta(minutes=5)
    assert built.key_manager == PluginConfig("disk")
    assert built.upstream_authority is None
    assert built.node_attestors == (PluginConfig("join_token"),)


def test_every_setting_is_taken():
    built = config(
        bind="[::1]:9000",
        admin_socket="/run/tessera/admin.sock",
        db="postgresql+psycopg://tessera@db/tessera",
        ca_ttl="12h",
        default_x509_svid_ttl="30m",
        default_jwt_svid_ttl=120,
        ca_key_type="rsa-2048",
        jwt_key_type="ec-p384",
        log_level="debug",
    )

    assert (built.bind_host, built.bind_port) == ("::1", 9000)
    assert built.admin_socket_path == Path("/run/tessera/admin.sock")
    assert built.database_url == "postgresql+psycopg://tessera@db/tessera"
    assert built.ca_ttl == timedelta(hours=12)
    assert built.default_x509_svid_ttl == timedelta(minutes=30)
    assert built.default_jwt_svid_ttl == timedelta(seconds=120)
    assert built.ca_key_type is KeyType.RSA_2048
    assert built.jwt_key_type is KeyType.EC_P384
    assert built.log_level == "debug"


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("trust_domain", [None, ""])
def test_missing_trust_domain(trust_domain):
    assert refusal({"trust_domain": trust_domain, "data_dir": "d"}) == (
        "the trust domain is not set; pass --trust-domain, e.g. example.org"
    )


def test_upper_case_trust_domain():
    assert refusal({"trust_domain": "Example.org", "data_dir": "d"}) == (
        "trust domain 'Example.org' is not valid: trust domain must be lower case; "
        "use lower-case letters, digits, '.', '-' and '_', e.g. example.org"
    )


def test_missing_data_dir():
    assert refusal({"trust_domain": "example.org"}) == (
        "the data directory is not set; pass --data-dir, e.g. .tessera"
    )


def test_unknown_keys_are_named():
    assert refusal_of(colour="blue", bindd="x") == (
        "unknown server setting(s): bindd, colour; "
        "see docs/server-configuration.md for the settings a server takes"
    )


@pytest.mark.parametrize(
    "bind", ["nope", "127.0.0.1", ":8081", "host:http", "host:65536", "::1:8081", "[host]:8081"]
)
def test_bad_bind(bind):
    assert refusal_of(bind=bind) == f"bind address {bind!r} is not HOST:PORT, e.g. 127.0.0.1:8081"


def test_bind_port_0_takes_any_free_port():
    built = config(bind="[::]:0")

    assert (built.bind_host, built.bind_port) == ("::", 0)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ca_ttl", "1 week", f"ca-ttl '1 week' is not a duration; {DURATION_HINT}"),
        ("ca_ttl", "0", "ca-ttl must be greater than zero"),
        ("ca_ttl", 0, "ca-ttl must be greater than zero"),
        (
            "default_jwt_svid_ttl",
            "-5m",
            f"default-jwt-svid-ttl '-5m' is not a duration; {DURATION_HINT}",
        ),
        ("default_x509_svid_ttl", "1.5h", f"default-x509-svid-ttl '1.5h' is not a duration; "
                                          f"{DURATION_HINT}"),
    ],
)
def test_bad_durations(key, value, message):
    assert refusal_of(**{key: value}) == message


@pytest.mark.parametrize("value", [1.5, True, ["1h"]])
def test_durations_of_the_wrong_toml_type(value):
    assert refusal_of(ca_ttl=value) == (
        f'ca-ttl {value!r} is not a duration; write a string such as "90s", "15m" or "1h"'
    )


def test_x509_svid_ttl_longer_than_the_ca_ttl():
    assert refusal_of(ca_ttl="1h", default_x509_svid_ttl="2h") == (
        "the default X509-SVID TTL (2h) is longer than the CA TTL (1h); "
        "SVIDs cannot outlive their CA"
    )


def test_ca_ttl_shorter_than_the_default_x509_svid_ttl_names_both():
    assert refusal_of(ca_ttl="30m") == (
        "the default X509-SVID TTL (1h) is longer than the CA TTL (30m); "
        "SVIDs cannot outlive their CA"
    )


def test_x509_svid_ttl_equal_to_the_ca_ttl_is_allowed():
    assert config(ca_ttl="1h", default_x509_svid_ttl="60m").default_x509_svid_ttl == timedelta(
        hours=1
    )


def test_bad_key_type():
    assert refusal_of(ca_key_type="dsa") == (
        "key type 'dsa' is not supported; use one of ec-p256, ec-p384, rsa-2048, rsa-4096"
    )


# -- plugin tables ----------------------------------------------------------------------


def test_plugin_tables():
    built = config(
        key_manager={"memory": {}},
        upstream_authority={"disk": {"cert_file_path": "/c.pem", "key_file_path": "/k.pem"}},
        node_attestors={"join_token": {}, "x509pop": {"ca_bundle_path": "/ca.pem"}},
    )

    assert built.key_manager == PluginConfig("memory", {})
    assert built.upstream_authority == PluginConfig(
        "disk", {"cert_file_path": "/c.pem", "key_file_path": "/k.pem"}
    )
    assert built.node_attestors == (
        PluginConfig("join_token", {}),
        PluginConfig("x509pop", {"ca_bundle_path": "/ca.pem"}),
    )


def test_a_plugin_may_be_named_by_a_string():
    assert config(key_manager="memory").key_manager == PluginConfig("memory")


def test_two_key_managers_are_refused():
    assert refusal_of(key_manager={"memory": {}, "disk": {}}) == (
        "[key_manager] names 2 plugins; configure exactly one"
    )


def test_two_upstream_authorities_are_refused():
    assert refusal_of(upstream_authority={"disk": {}, "vault": {}}) == (
        "[upstream_authority] names 2 plugins; configure exactly one"
    )


def test_a_plugin_section_that_is_not_a_table():
    assert refusal_of(key_manager=["memory"]) == (
        "[key_manager] must be a table of plugin tables, e.g. [key_manager.disk]"
    )


def test_plugin_settings_that_are_not_a_table():
    assert refusal_of(key_manager={"memory": 1}) == (
        "[key_manager.memory] must be a table of settings"
    )


# -- the TOML file ----------------------------------------------------------------------


def test_a_toml_file_becomes_a_config(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(
        'trust_domain = "example.org"\n'
        'data_dir = "/srv/tessera"\n'
        'ca_ttl = "12h"\n'
        "\n"
        "[key_manager.memory]\n"
    )

    built = server_config(load_config_file(path))

    assert built.ca_ttl == timedelta(hours=12)
    assert built.key_manager == PluginConfig("memory", {})


def test_a_file_that_is_not_toml(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('trust_domain = "example.org\n')

    with pytest.raises(ConfigError) as refused:
        load_config_file(path)

    assert refused.value.message.startswith(f"config file {path} is not valid TOML: ")
    assert "line 1" in refused.value.message


def test_a_file_that_does_not_exist(tmp_path):
    path = tmp_path / "missing.toml"

    with pytest.raises(ConfigError) as refused:
        load_config_file(path)

    assert refused.value.message == (
        f"cannot read config file {path}: No such file or directory"
    )


# -- the JWT authority's key type --------------------------------------------------------


@pytest.mark.parametrize(("ca_key_type", "jwt_key_type"), [
    ("ec-p256", KeyType.EC_P256),
    ("ec-p384", KeyType.EC_P384),
    ("rsa-2048", KeyType.RSA_2048),
    ("rsa-4096", KeyType.RSA_4096),
])
def test_the_jwt_key_type_follows_the_ca_key_type(ca_key_type, jwt_key_type):
    assert config(ca_key_type=ca_key_type).jwt_authority_key_type == jwt_key_type


def test_a_jwt_key_type_set_explicitly_wins():
    built = config(ca_key_type="rsa-2048", jwt_key_type="ec-p384")
    assert built.jwt_authority_key_type == KeyType.EC_P384


def test_a_config_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "server.toml"
    path.write_bytes(b'trust_domain = "example.org"\n# caf\xe9\n')

    with pytest.raises(ConfigError) as refused:
        load_config_file(path)

    assert refused.value.message == (
        f"config file {path} is not UTF-8 text (line 2 has the byte 0xe9); TOML files must "
        "be UTF-8, so save it as UTF-8"
    )


def test_a_server_lease_ttl_under_three_seconds_is_refused():
    with pytest.raises(ConfigError) as refused:
        config(server_lease_ttl="1s")
    assert refused.value.message == (
        "server-lease-ttl (1s) is shorter than 3s; the server renews its lease every second, "
        "so give it a few seconds"
    )
    assert config(server_lease_ttl="3s").server_lease_ttl == timedelta(seconds=3)


def test_tombstones_are_kept_a_day_unless_configured() -> None:
    assert config().tombstone_retention == timedelta(hours=24)
    assert config(tombstone_retention="10m").tombstone_retention == timedelta(minutes=10)


# -- the listeners' limits --------------------------------------------------------------


def test_limits_default_to_bounds_a_slow_client_cannot_stretch():
    assert config().limits == ConnectionLimits(
        request_timeout=timedelta(seconds=10), idle_timeout=timedelta(seconds=5),
        max_connections=1024, max_connections_per_peer=64,
    )


def test_limits_are_taken_from_flags_or_the_file():
    built = config(request_timeout="1s", idle_timeout="1m", max_connections="200",
                   max_connections_per_peer=8)
    assert built.limits == ConnectionLimits(
        request_timeout=timedelta(seconds=1), idle_timeout=timedelta(minutes=1),
        max_connections=200, max_connections_per_peer=8,
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("request_timeout", "0", "request-timeout must be greater than zero"),
        ("request_timeout", "soon", f"request-timeout 'soon' is not a duration; {DURATION_HINT}"),
        ("idle_timeout", "4s", "idle-timeout 4s is too short: agents keep an idle connection "
                               "for 4s, so it must be at least 5s"),
        ("max_connections", 0, "max-connections 0 is not a whole number of connections of 1 "
                               "or more"),
        ("max_connections_per_peer", "many", "max-connections-per-peer 'many' is not a whole "
                                             "number of connections of 1 or more"),
        ("max_connections_per_peer", 2.5, "max-connections-per-peer 2.5 is not a whole "
                                          "number of connections of 1 or more"),
    ],
)
def test_bad_limits(key, value, message):
    assert refusal_of(**{key: value}) == message
