"""server_config's [federation] table: the bundle endpoint's settings, with exact refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ca.config import BundleEndpointConfig, FederationConfig, server_config
from sdk.errors import ConfigError


def config(federation: Any) -> Any:
    return server_config(
        {"trust_domain": "example.org", "data_dir": "/var/lib/tessera", "federation": federation}
    )


def refusal(federation: Any, **values: Any) -> str:
    with pytest.raises(ConfigError) as refused:
        server_config({
            "trust_domain": "example.org",
            "data_dir": "/var/lib/tessera",
            "federation": federation,
            **values,
        })
    return refused.value.message


def test_no_federation_table_serves_no_bundle_endpoint():
    built = server_config({"trust_domain": "example.org", "data_dir": "/var/lib/tessera"})

    assert built.federation == FederationConfig(bundle_endpoint=None)
    assert config({}).federation.bundle_endpoint is None


def test_https_spiffe_is_the_default_profile():
    built = config({"bundle_endpoint": {"address": "0.0.0.0:8443"}})

    assert built.federation.bundle_endpoint == BundleEndpointConfig(
        host="0.0.0.0", port=8443, profile="https_spiffe"
    )


def test_https_web_takes_its_certificate_files():
    built = config({"bundle_endpoint": {
        "address": "[::1]:443",
        "profile": "https_web",
        "cert_file": "/etc/tessera/web.pem",
        "key_file": "/etc/tessera/web.key",
    }})

    assert built.federation.bundle_endpoint == BundleEndpointConfig(
        host="::1",
        port=443,
        profile="https_web",
        cert_file=Path("/etc/tessera/web.pem"),
        key_file=Path("/etc/tessera/web.key"),
    )


WHERE = "[federation.bundle_endpoint]"


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        ("yes", "[federation] must be a table, e.g. [federation.bundle_endpoint] with an address"),
        ({"relationships": []},
         "unknown [federation] setting(s): relationships; it takes [federation.bundle_endpoint] "
         "(relationships are made with 'tessera server federation create')"),
        ({"bundle_endpoint": "0.0.0.0:8443"},
         f'{WHERE} must be a table of settings, e.g. address = "0.0.0.0:8443"'),
        ({"bundle_endpoint": {"address": "0.0.0.0:8443", "port": 8443}},
         f"unknown {WHERE} setting(s): port; it takes address, profile, cert_file and key_file"),
        ({"bundle_endpoint": {}}, f'{WHERE} needs an address, e.g. address = "0.0.0.0:8443"'),
        ({"bundle_endpoint": {"address": 8443}},
         f'{WHERE} needs an address, e.g. address = "0.0.0.0:8443"'),
        ({"bundle_endpoint": {"address": "8443"}},
         f"{WHERE} address '8443' is not HOST:PORT, e.g. \"0.0.0.0:8443\""),
        ({"bundle_endpoint": {"address": "0.0.0.0:8443", "profile": "https"}},
         f"{WHERE} profile 'https' is not one of https_spiffe (serve with the server's SVID) "
         "or https_web (serve with cert_file and key_file)"),
        ({"bundle_endpoint": {"address": "0.0.0.0:8443", "cert_file": "/c.pem"}},
         f"{WHERE} cert_file is only for profile https_web; with https_spiffe the endpoint "
         "serves the server's own SVID, so remove them"),
        ({"bundle_endpoint": {"address": "0.0.0.0:8443", "cert_file": "/c.pem",
                              "key_file": "/k.pem"}},
         f"{WHERE} cert_file and key_file are only for profile https_web; with https_spiffe "
         "the endpoint serves the server's own SVID, so remove them"),
        ({"bundle_endpoint": {"address": "0.0.0.0:8443", "profile": "https_web",
                              "cert_file": "/c.pem"}},
         f"{WHERE} profile https_web needs key_file: the web PKI certificate (with its chain) "
         "and private key the endpoint serves with"),
        ({"bundle_endpoint": {"address": "0.0.0.0:8443", "profile": "https_web"}},
         f"{WHERE} profile https_web needs cert_file and key_file: the web PKI certificate "
         "(with its chain) and private key the endpoint serves with"),
        ({"bundle_endpoint": {"address": "0.0.0.0:8443", "profile": "https_web",
                              "cert_file": 1, "key_file": "/k.pem"}},
         f"{WHERE} cert_file must be a file path"),
    ],
)
def test_bad_federation_settings_are_refused_with_a_sentence(federation: Any, message: str):
    assert refusal(federation) == message


def test_the_bundle_endpoint_needs_a_port_of_its_own():
    message = refusal({"bundle_endpoint": {"address": "127.0.0.1:8081"}}, bind="127.0.0.1:8081")

    assert message == (
        "the bundle endpoint and the node API both listen on 127.0.0.1:8081; "
        "give [federation.bundle_endpoint] address a port of its own"
    )


def test_a_config_file_table_reaches_the_server_config(tmp_path: Path):
    from sdk.commandline import load_config_file

    path = tmp_path / "server.toml"
    path.write_text(
        'trust_domain = "example.org"\ndata_dir = "/d"\n'
        '[federation.bundle_endpoint]\naddress = "127.0.0.1:8443"\n'
    )

    built = server_config(load_config_file(path))

    assert built.federation.bundle_endpoint == BundleEndpointConfig("127.0.0.1", 8443)
