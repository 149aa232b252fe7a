"""The bundle endpoint's app and its https_web certificate, which follows the files."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.api.tls import ServerIdentity
from ca.config import BundleEndpointConfig
from ca.federation.endpoint import (
    ServingCertificate,
    bundle_endpoint_context,
    create_bundle_endpoint_app,
)
from sdk.errors import ConfigError
from sdk.keys import PrivateKey
from tests.unit.ca.federation_helpers import bundle, call, svid, web_pki


def write_pair(directory: Path, leaf: x509.Certificate, key: PrivateKey) -> tuple[Path, Path]:
    cert_file, key_file = directory / "web.pem", directory / "web.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_file, key_file


def served_certificate(context: ssl.SSLContext) -> x509.Certificate:
    """The certificate ``context`` presents, read back through a real handshake."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(c_in, c_out, server_side=False)
    server_side = context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client_side, server_side):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    der = client_side.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_endpoint_serves_the_current_bundle_at_the_root():
    current = [bundle("example.org", 0, sequence=1)]
    app = create_bundle_endpoint_app(lambda: current[0])

    first: Any = call(app, "GET", "/")
    current[0] = bundle("example.org", 0, 1, sequence=2)
    second: Any = call(app, "GET", "/")

    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert json.loads(first.content)["spiffe_sequence"] == 1
    assert second.content == current[0].to_spiffe_json()
    assert call(app, "GET", "/other").status_code == 404  # type: ignore[attr-defined]
    assert call(app, "GET", "/docs").status_code == 404  # type: ignore[attr-defined]


def test_an_https_web_certificate_is_read_again_when_its_files_change(tmp_path: Path):
    _, leaf, key = web_pki("127.0.0.1")
    cert_file, key_file = write_pair(tmp_path, leaf, key)
    serving = ServingCertificate(cert_file, key_file)
    assert served_certificate(serving.context) == leaf

    _, renewed, renewed_key = web_pki("127.0.0.2")
    write_pair(tmp_path, renewed, renewed_key)
    os.utime(cert_file, ns=(1, 1))  # a different stamp whatever the clock's resolution

    assert served_certificate(serving.context) == renewed


def test_a_broken_replacement_keeps_the_certificate_served(tmp_path: Path):
    _, leaf, key = web_pki()
    cert_file, key_file = write_pair(tmp_path, leaf, key)
    serving = ServingCertificate(cert_file, key_file)

    cert_file.write_text("not a certificate")

    assert served_certificate(serving.context) == leaf


def test_unreadable_certificate_files_are_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError) as missing:
        ServingCertificate(tmp_path / "web.pem", tmp_path / "web.key")
    (tmp_path / "web.pem").write_text("not a certificate")
    (tmp_path / "web.key").write_text("not a key")
    with pytest.raises(ConfigError) as broken:
        ServingCertificate(tmp_path / "web.pem", tmp_path / "web.key")

    assert missing.value.message == (
        f"cannot read the bundle endpoint's {tmp_path / 'web.pem'}: No such file or directory; "
        "check [federation.bundle_endpoint] cert_file and key_file"
    )
    assert broken.value.message.startswith(
        f"cannot load the bundle endpoint certificate {tmp_path / 'web.pem'} with key "
        f"{tmp_path / 'web.key'} ("
    )
    assert broken.value.message.endswith(
        "); they must be a PEM certificate chain and its matching unencrypted PEM private key"
    )


def test_https_spiffe_serves_the_servers_current_svid():
    first, first_key = svid("spiffe://example.org/tessera/server")
    renewed, renewed_key = svid("spiffe://example.org/tessera/server", 1)
    current = [ServerIdentity((first,), first_key, bundle("example.org", 0), version=(1, 1))]
    context = bundle_endpoint_context(BundleEndpointConfig("127.0.0.1", 8443), lambda: current[0])

    assert served_certificate(context) == first  # to a client without a certificate
    current[0] = ServerIdentity(
        (renewed,), renewed_key, bundle("example.org", 0, 1, sequence=2), version=(2, 2)
    )
    assert served_certificate(context) == renewed
