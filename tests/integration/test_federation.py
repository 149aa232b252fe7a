"""Two real trust domains federating, driven through the ``tessera`` CLI.

Steps, as an operator would take them:

1. start example.org and partner.org, each serving its bundle endpoint (https_spiffe);
2. give each the other's bundle and create the relationships;
3. each stores exactly the bundle the other serves;
4. a key prepared on partner.org reaches example.org on ``federation refresh``;
5. another reaches it by the refresher alone, at partner.org's short refresh hint;
6. a wrong endpoint SPIFFE ID is refused with a sentence;
7. deleting the relationship deletes the federated bundle.

And once over https_web, with a web certificate from a test CA made here and
trusted by example.org through ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.integration.conftest import ServerProcess, free_port
from tests.support.pki import TestCA, write_key_pem, write_pem

pytestmark = pytest.mark.integration

PARTNER_SERVER_ID = "spiffe://partner.org/tessera/server"
EXAMPLE_SERVER_ID = "spiffe://example.org/tessera/server"
# A CA TTL of 60s gives partner.org a refresh hint of 6s (a tenth of it).
SHORT_CA = ["--ca-ttl", "60s", "--default-x509-svid-ttl", "30s"]


def endpoint_config(directory: Path, name: str, port: int, **settings: str) -> list[str]:
    """``--config`` for a server whose bundle endpoint listens on ``port``."""
    lines = ["[federation.bundle_endpoint]", f'address = "127.0.0.1:{port}"']
    lines += [f'{key} = "{value}"' for key, value in settings.items()]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return ["--config", str(path)]


def own_bundle(server: ServerProcess) -> dict[str, Any]:
    return server.cli_json("bundle", "show")


def federated(server: ServerProcess, trust_domain: str) -> dict[str, Any] | None:
    bundles: Any = server.cli_json("bundle", "list")["bundles"]
    return bundles.get(f"spiffe://{trust_domain}")


def x509_authorities(document: dict[str, Any] | None) -> set[str]:
    keys = (document or {}).get("keys", [])
    return {k["x5c"][0] for k in keys if k.get("use") == "x509-svid"}


def jwt_kids(document: dict[str, Any] | None) -> set[str]:
    return {k["kid"] for k in (document or {}).get("keys", []) if k.get("use") == "jwt-svid"}


def write_bundle(server: ServerProcess, path: Path) -> str:
    path.write_text(server.cli("bundle", "show", "--format", "spiffe").stdout)
    return str(path)


def federate(holder: ServerProcess, trust_domain: str, port: int, server_id: str,
             bundle_path: str) -> dict[str, Any]:
    return holder.cli_json(
        "federation", "create", "--trust-domain", trust_domain,
        "--bundle-endpoint-url", f"https://127.0.0.1:{port}",
        "--bundle-endpoint-profile", "https_spiffe",
        "--endpoint-spiffe-id", server_id,
        "--trust-domain-bundle-path", bundle_path,
    )


def assert_holds_current_bundle(holder: ServerProcess, source: ServerProcess,
                                trust_domain: str) -> None:
    """After a refresh, ``holder`` stores exactly the bundle ``source`` serves (retried
    if ``source`` rotated in between)."""
    for _ in range(3):
        holder.cli_json("federation", "refresh", "--trust-domain", trust_domain)
        if federated(holder, trust_domain) == own_bundle(source):
            return
    assert federated(holder, trust_domain) == own_bundle(source)


def test_two_trust_domains_federate_over_https_spiffe(start_server: Any, tmp_path: Path) -> None:
    example_port, partner_port = free_port(), free_port()
    example: ServerProcess = start_server(
        "example", trust_domain="example.org",
        extra=endpoint_config(tmp_path, "example", example_port),
    )
    partner: ServerProcess = start_server(
        "partner", trust_domain="partner.org",
        extra=[*endpoint_config(tmp_path, "partner", partner_port), *SHORT_CA],
    )

    # 2. each is given the other's bundle once, out of band
    created = federate(example, "partner.org", partner_port, PARTNER_SERVER_ID,
                       write_bundle(partner, tmp_path / "partner.json"))
    federate(partner, "example.org", example_port, EXAMPLE_SERVER_ID,
             write_bundle(example, tmp_path / "example.json"))
    assert created["bundle_endpoint_profile"] == "https_spiffe"
    assert created["bundle"]["x509_authorities"] == 1

    # 3. each holds the other's bundle as served by its endpoint
    assert_holds_current_bundle(partner, example, "example.org")
    assert_holds_current_bundle(example, partner, "partner.org")
    assert_holds_current_bundle(partner, example, "example.org")
    shown = example.cli("federation", "show", "--trust-domain", "partner.org").stdout
    assert f"Endpoint SPIFFE ID      : {PARTNER_SERVER_ID}" in shown
    assert "Last error" not in shown

    # 4. a new partner.org key, fetched on demand
    partner.cli("localauthority", "x509", "prepare")
    assert len(x509_authorities(own_bundle(partner))) == 2
    example.cli_json("federation", "refresh", "--trust-domain", "partner.org")
    assert x509_authorities(federated(example, "partner.org")) == x509_authorities(
        own_bundle(partner))

    # 5. another one, left to the refresher (partner.org's refresh hint is 6s)
    partner.cli("localauthority", "jwt", "prepare")
    wanted = jwt_kids(own_bundle(partner))
    assert len(wanted) == 2
    deadline = time.monotonic() + 20
    while jwt_kids(federated(example, "partner.org")) != wanted:
        assert time.monotonic() < deadline, example.log()
        time.sleep(0.5)

    # 6. an endpoint that is not the one named is refused, and the bundle kept
    kept = federated(example, "partner.org")
    example.cli("federation", "update", "--trust-domain", "partner.org",
                "--endpoint-spiffe-id", "spiffe://partner.org/not-the-server")
    refused = example.cli("federation", "refresh", "--trust-domain", "partner.org", check=False)
    assert refused.returncode == 1
    assert f"presented {PARTNER_SERVER_ID}, not the expected endpoint SPIFFE ID " \
        "spiffe://partner.org/not-the-server; check --endpoint-spiffe-id" in refused.stderr
    assert refused.stdout == ""
    assert x509_authorities(federated(example, "partner.org")) == x509_authorities(kept)
    last_error = example.cli_json("federation", "show", "--trust-domain", "partner.org")
    assert "not-the-server" in str(last_error["last_error"])

    # 7. no relationship, no trust
    deleted = example.cli_json("federation", "delete", "--trust-domain", "partner.org")
    assert deleted == {"trust_domain": "partner.org", "deleted": True}
    assert federated(example, "partner.org") is None
    assert example.cli_json("federation", "list") == {"relationships": []}
    missing = example.cli("federation", "show", "--trust-domain", "partner.org", check=False)
    assert missing.returncode == 1
    assert "no federation relationship with trust domain partner.org" in missing.stderr
    assert federated(partner, "example.org") is not None  # the other side is its own business


def make_web_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A test web CA and a certificate it issued for 127.0.0.1: (ca, cert, key) files."""
    web_ca = TestCA.named("Tessera test web CA")
    web = web_ca.issue_certificate(subject="127.0.0.1", ip_addresses=["127.0.0.1"],
                                   extended_key_usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    return (write_pem(directory / "web-ca.pem", web_ca.certificate),
            write_pem(directory / "web.pem", web.certificate),
            write_key_pem(directory / "web.key", web.key))  # fmt: skip


def test_federating_over_https_web(start_server: Any, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ca_file, cert_file, key_file = make_web_certificate(tmp_path)
    partner_port = free_port()
    partner: ServerProcess = start_server(
        "partner", trust_domain="partner.org",
        extra=endpoint_config(tmp_path, "partner", partner_port, profile="https_web",
                              cert_file=str(cert_file), key_file=str(key_file)),
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # example.org trusts the test web CA
    example: ServerProcess = start_server("example", trust_domain="example.org")

    created = example.cli_json(
        "federation", "create", "--trust-domain", "partner.org",
        "--bundle-endpoint-url", f"https://127.0.0.1:{partner_port}",
        "--bundle-endpoint-profile", "https_web",
    )
    assert (created["bundle"], created["endpoint_spiffe_id"]) == (None, None)

    # (the refresher may have fetched it first: a new relationship is due at once)
    refreshed = example.cli_json("federation", "refresh", "--trust-domain", "partner.org")

    assert (refreshed["last_error"], refreshed["bundle"]["x509_authorities"]) == (None, 1)
    assert federated(example, "partner.org") == own_bundle(partner)
    text = example.cli("federation", "list").stdout
    assert text.startswith("Found 1 federation relationship\n\nTrust domain            : "
                           "partner.org")
    assert json.loads(example.cli("federation", "list", "--output", "json").stdout)[
        "relationships"][0]["bundle"]["x509_authorities"] == 1
