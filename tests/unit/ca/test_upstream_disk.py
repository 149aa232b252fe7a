from __future__ import annotations

from datetime import timedelta

import pytest
from spiffe import SpiffeId

from ca.keymanager import LocalSigner
from ca.upstream import load_upstream_authority
from ca.x509ca import build_x509_svid
from sdk.errors import ConfigError, FailedPrecondition
from sdk.keys import KeyType
from tests.support.pki import TestCA, key_pem, pem, self_signed
from tests.unit.ca.conftest import START, TRUST_DOMAIN

WEB = SpiffeId("spiffe://example.org/web")


# An organisation's PKI, valid around START: a day before it to a year after.
VALIDITY = {"not_before": START - timedelta(days=1), "ttl": timedelta(days=366)}


@pytest.fixture
def root_ca(key_pool):
    """An ordinary (non-SPIFFE) root CA, as an organisation's PKI would have."""
    return TestCA.named("Example Root CA", key=key_pool(KeyType.EC_P384, 4), **VALIDITY)


@pytest.fixture
def root_files(tmp_path, root_ca):
    root, key = root_ca.certificate, root_ca.key
    (tmp_path / "root.pem").write_bytes(pem(root))
    (tmp_path / "root.key").write_bytes(key_pem(key))
    config = {
        "cert_file_path": str(tmp_path / "root.pem"),
        "key_file_path": str(tmp_path / "root.key"),
    }
    return root, key, config


def _mint(upstream, key, *, days=1):
    return upstream.mint_x509_ca(
        trust_domain=TRUST_DOMAIN,
        public_key=key.public_key(),
        not_before=START,
        not_after=START + timedelta(days=days),
    )


def _issue_svid(minted, server_key, workload_key):
    return build_x509_svid(
        spiffe_id=WEB,
        public_key=workload_key.public_key(),
        ca_certificate=minted.certificate,
        signer=LocalSigner("server", server_key),
        now=START,
        ttl=timedelta(hours=1),
    )


def test_svid_from_a_disk_signed_intermediate_verifies_against_the_root(
    root_files, tmp_path, key_pool, openssl_verify, pkilint
):
    root, _, config = root_files
    upstream = load_upstream_authority("disk", config, tmp_path)
    server_key = key_pool(KeyType.EC_P256, 5)
    minted = _mint(upstream, server_key)

    assert minted.chain == ()
    assert minted.upstream_roots == (root,)
    assert minted.certificate.issuer == root.subject
    assert pkilint(minted.certificate) == []
    svid = _issue_svid(minted, server_key, key_pool(KeyType.EC_P256, 1))
    result = openssl_verify([root], svid, untrusted=[minted.certificate])
    assert result.returncode == 0, result.stdout + result.stderr


def test_minted_authority_is_capped_at_the_upstream_certificate(root_files, tmp_path, key_pool):
    root, _, config = root_files
    upstream = load_upstream_authority("disk", config, tmp_path)
    minted = _mint(upstream, key_pool(KeyType.EC_P256, 5), days=1000)
    assert minted.certificate.not_valid_after_utc == root.not_valid_after_utc


def test_upstream_intermediate_with_a_bundle_file(
    root_files, root_ca, tmp_path, key_pool, openssl_verify
):
    root, _, _ = root_files
    issuing_ca = root_ca.intermediate(
        common_name="Example Issuing CA", key=key_pool(KeyType.RSA_2048, 4), **VALIDITY
    )
    issuing = issuing_ca.certificate
    (tmp_path / "issuing.pem").write_bytes(pem(issuing))
    (tmp_path / "issuing.key").write_bytes(key_pem(issuing_ca.key))
    config = {
        "cert_file_path": str(tmp_path / "issuing.pem"),
        "key_file_path": str(tmp_path / "issuing.key"),
    }
    with pytest.raises(ConfigError) as err:
        load_upstream_authority("disk", config, tmp_path)
    assert err.value.message == (
        f"the certificate in {tmp_path / 'issuing.pem'} is not self-signed, so Tessera cannot "
        "tell which roots to trust; set bundle_file_path to a PEM file of the root certificates"
    )

    upstream = load_upstream_authority(
        "disk", {**config, "bundle_file_path": str(tmp_path / "root.pem")}, tmp_path
    )
    server_key = key_pool(KeyType.EC_P256, 5)
    minted = _mint(upstream, server_key)
    assert minted.chain == (issuing,)
    assert minted.upstream_roots == (root,)
    svid = _issue_svid(minted, server_key, key_pool(KeyType.EC_P256, 1))
    result = openssl_verify([root], svid, untrusted=[minted.certificate, *minted.chain])
    assert result.returncode == 0, result.stdout + result.stderr


def test_key_that_does_not_match_is_refused(root_files, tmp_path, key_pool):
    _, _, config = root_files
    (tmp_path / "other.key").write_bytes(key_pem(key_pool(KeyType.EC_P384, 5)))
    with pytest.raises(ConfigError) as err:
        load_upstream_authority(
            "disk", {**config, "key_file_path": str(tmp_path / "other.key")}, tmp_path
        )
    assert err.value.message == (
        f"the private key in {tmp_path / 'other.key'} does not match the certificate in "
        f"{tmp_path / 'root.pem'}; point key_file_path at that certificate's key"
    )


def test_file_problems_are_explained(root_files, tmp_path, key_pool):
    _, key, config = root_files
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as err:
        load_upstream_authority("disk", {**config, "cert_file_path": missing}, tmp_path)
    assert err.value.message == (
        f"cannot read {missing} (No such file or directory); check the cert_file_path setting "
        "of upstream authority 'disk' and the file's permissions"
    )

    (tmp_path / "garbage.pem").write_text("hello")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        load_upstream_authority(
            "disk", {**config, "cert_file_path": str(tmp_path / "garbage.pem")}, tmp_path
        )

    (tmp_path / "locked.key").write_bytes(key_pem(key, password=b"secret"))
    with pytest.raises(ConfigError, match="is encrypted; upstream authority 'disk' needs it"):
        load_upstream_authority(
            "disk", {**config, "key_file_path": str(tmp_path / "locked.key")}, tmp_path
        )

    leaf = self_signed(subject="Not a CA", key=key, **VALIDITY).certificate
    (tmp_path / "leaf.pem").write_bytes(pem(leaf))
    with pytest.raises(ConfigError, match="is not a CA certificate"):
        load_upstream_authority(
            "disk", {**config, "cert_file_path": str(tmp_path / "leaf.pem")}, tmp_path
        )


def test_settings_are_checked(root_files, tmp_path):
    _, _, config = root_files
    with pytest.raises(ConfigError) as err:
        load_upstream_authority("disk", {"cert_file_path": config["cert_file_path"]}, tmp_path)
    assert err.value.message == "[upstream_authority.disk] key_file_path: is required"
    with pytest.raises(ConfigError) as err:
        load_upstream_authority("disk", {**config, "cert": "x"}, tmp_path)
    assert err.value.message == (
        "[upstream_authority.disk] cert: unknown setting; known settings: "
        "bundle_file_path, cert_file_path, key_file_path"
    )
    with pytest.raises(ConfigError) as err:
        load_upstream_authority("vault-pki", {}, tmp_path)
    assert err.value.message == (
        "unknown upstream authority 'vault-pki'; known upstream authorities: disk, "
        "shared_root, vault_pki"
    )


def test_an_expired_upstream_certificate_stops_minting(root_files, tmp_path, key_pool):
    root, _, config = root_files
    upstream = load_upstream_authority("disk", config, tmp_path)
    with pytest.raises(FailedPrecondition, match="renew it before the server can rotate"):
        upstream.mint_x509_ca(
            trust_domain=TRUST_DOMAIN,
            public_key=key_pool(KeyType.EC_P256, 5).public_key(),
            not_before=root.not_valid_after_utc,
            not_after=root.not_valid_after_utc + timedelta(days=1),
        )
