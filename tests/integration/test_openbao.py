"""`tessera server run` with its keys in OpenBao transit and its root in an OpenBao PKI mount."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import OpenBao
from tests.integration.conftest import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.openbao]


def server_toml(openbao: OpenBao, transit_mount: str, pki_mount: str) -> str:
    return f"""
[key_manager.vault_transit]
address = "{openbao.address}"
token = "{openbao.root_token}"
mount = "{transit_mount}"

[upstream_authority.vault_pki]
address = "{openbao.address}"
token = "{openbao.root_token}"
mount = "{pki_mount}"
"""


def test_server_signs_with_transit_under_the_bao_root(
    openbao: OpenBao, start_server: Any, tmp_path: Path
) -> None:
    transit_mount = openbao.enable_transit()
    pki = openbao.enable_pki()
    config = tmp_path / "server.toml"
    config.write_text(server_toml(openbao, transit_mount, pki.mount))
    server: ServerProcess = start_server(extra=["--config", str(config)])

    out = tmp_path / "out"
    server.cli("x509", "mint", "--spiffe-id", "spiffe://example.org/web", "--write", str(out))
    leaf, *intermediates = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    assert len(intermediates) == 1
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "intermediates.pem").write_bytes(
        b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in intermediates)
    )
    (tmp_path / "root.pem").write_text(pki.root_pem)
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"),
         "-untrusted", str(tmp_path / "intermediates.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")

    # The bundle publishes bao's root, and nothing else.
    bundle = x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())
    assert bundle == [x509.load_pem_x509_certificate(pki.root_pem.encode())]

    # The authority keys (X.509 and JWT) are transit keys; none is on the server's disk.
    keys = openbao.client().list(f"{transit_mount}/keys")["data"]["keys"]
    assert len(keys) == 2
    assert all(name.startswith("tessera-") for name in keys)
    files = [path for path in server.data_dir.rglob("*") if path.is_file()]
    assert any(path.name.endswith(".sqlite3") for path in files)
    assert not (server.data_dir / "keys").exists()
    for path in files:
        assert b"PRIVATE KEY" not in path.read_bytes(), path
