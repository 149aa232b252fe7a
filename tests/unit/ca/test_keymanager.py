from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

from ca.keymanager import LocalSigner, load_key_manager
from sdk.errors import ConfigError, InvalidArgument, NotFound
from sdk.keys import KeyType

KEK = "0123456789abcdef0123456789abcdef"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def _no_kek_in_environment(monkeypatch):
    monkeypatch.delenv("TESSERA_KEK", raising=False)


@pytest.fixture(params=["memory", "disk"])
def manager(request, tmp_path):
    return load_key_manager(request.param, {}, tmp_path)


def test_unknown_key_manager_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_key_manager("hsm", {}, tmp_path)
    assert err.value.message == (
        "unknown key manager 'hsm'; known key managers: disk, memory, vault_transit"
    )


def test_unknown_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_key_manager("memory", {"keys_dir": "x"}, tmp_path)
    assert err.value.message == (
        "[key_manager.memory] keys_dir: unknown setting; it takes no settings"
    )
    with pytest.raises(ConfigError) as err:
        load_key_manager("disk", {"kek": "x", "dir": "y"}, tmp_path)
    assert err.value.message == (
        "[key_manager.disk] kek: unknown setting; dir: unknown setting; "
        "known settings: kek_file, keys_dir"
    )
    with pytest.raises(ConfigError) as err:
        load_key_manager("disk", {"kek_file": 7, "keys_dir": ""}, tmp_path)
    assert err.value.message == (
        "[key_manager.disk] keys_dir: must be a file path, not an empty string; "
        "kek_file: must be a file path (a string), got 7"
    )


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_generate_get_sign_delete(manager, key_type):
    signer = manager.generate_key("x509-ca-a", key_type)
    assert signer.key_id == "x509-ca-a"
    assert signer.key_type is key_type
    assert signer.local_private_key() is not None
    again = manager.get_key("x509-ca-a")
    assert again.public_key() == signer.public_key()

    signature = again.sign(b"data")
    public_key = signer.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        digest = hashes.SHA384() if key_type is KeyType.EC_P384 else hashes.SHA256()
        public_key.verify(signature, b"data", ec.ECDSA(digest))
    else:
        public_key.verify(signature, b"data", padding.PKCS1v15(), hashes.SHA256())

    manager.delete_key("x509-ca-a")
    with pytest.raises(NotFound, match="has no key with id 'x509-ca-a'"):
        manager.get_key("x509-ca-a")
    manager.delete_key("x509-ca-a")  # absent: no error


def test_generate_replaces_a_key_of_the_same_id(manager):
    first = manager.generate_key("k", KeyType.EC_P256)
    second = manager.generate_key("k", KeyType.EC_P256)
    assert first.public_key() != second.public_key()
    assert manager.get_key("k").public_key() == second.public_key()


def test_local_signer_repr_hides_the_key(key_pool):
    assert repr(LocalSigner("k", key_pool(KeyType.EC_P256))) == (
        "LocalSigner(key_id='k', key_type='ec-p256')"
    )


def test_disk_keys_survive_a_restart_and_are_private(tmp_path):
    manager = load_key_manager("disk", {}, tmp_path)
    signer = manager.generate_key("k1", KeyType.EC_P256)
    keys_dir = tmp_path / "keys"
    assert _mode(keys_dir) == 0o700
    assert _mode(keys_dir / "k1.pem") == 0o600
    assert _mode(keys_dir / "kek") == 0o600
    assert sorted(p.name for p in keys_dir.iterdir()) == ["k1.pem", "kek"]  # no temp files

    restarted = load_key_manager("disk", {}, tmp_path)
    assert restarted.get_key("k1").public_key() == signer.public_key()


def test_disk_keys_are_encrypted_pkcs8(tmp_path):
    manager = load_key_manager("disk", {}, tmp_path)
    manager.generate_key("k1", KeyType.EC_P256)
    pem = (tmp_path / "keys" / "k1.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")


def test_kek_from_file_and_environment(tmp_path, monkeypatch):
    kek_file = tmp_path / "kek.secret"
    kek_file.write_text(KEK + "\n")
    from_file = load_key_manager("disk", {"kek_file": str(kek_file)}, tmp_path)
    signer = from_file.generate_key("k1", KeyType.EC_P256)
    assert not (tmp_path / "keys" / "kek").exists()

    monkeypatch.setenv("TESSERA_KEK", KEK)
    from_env = load_key_manager("disk", {}, tmp_path)
    assert from_env.get_key("k1").public_key() == signer.public_key()


def test_wrong_kek_says_what_to_check(tmp_path, monkeypatch):
    keys_dir = tmp_path / "custom"
    load_key_manager("disk", {"keys_dir": str(keys_dir)}, tmp_path).generate_key(
        "k1", KeyType.EC_P256
    )
    monkeypatch.setenv("TESSERA_KEK", "another-secret-of-enough-length")
    manager = load_key_manager("disk", {"keys_dir": str(keys_dir)}, tmp_path)
    with pytest.raises(ConfigError) as err:
        manager.get_key("k1")
    assert err.value.message == (
        f"the key in {keys_dir / 'k1.pem'} cannot be decrypted with the key-encryption key "
        "from the TESSERA_KEK environment variable; check that kek_file or TESSERA_KEK holds "
        "the same secret the key was written with, and that the file is an intact encrypted "
        "PKCS#8 PEM"
    )


def test_short_or_missing_kek_file_is_refused(tmp_path, monkeypatch):
    short = tmp_path / "short"
    short.write_text("secret")
    with pytest.raises(ConfigError) as err:
        load_key_manager("disk", {"kek_file": str(short)}, tmp_path)
    assert err.value.message == (
        f"the key-encryption key from kek_file {short} is shorter than 16 bytes; use a long "
        "random secret, e.g. the output of `openssl rand -hex 32`"
    )
    with pytest.raises(ConfigError, match="cannot read the key-encryption key file"):
        load_key_manager("disk", {"kek_file": str(tmp_path / "absent")}, tmp_path)


@pytest.mark.parametrize("key_id", ["../escape", "a/b", ".hidden", "", "x" * 129, "kek\x00"])
def test_disk_key_ids_must_be_safe_file_names(tmp_path, key_id):
    manager = load_key_manager("disk", {}, tmp_path)
    with pytest.raises(InvalidArgument, match="is not a safe file name"):
        manager.generate_key(key_id, KeyType.EC_P256)
    with pytest.raises(InvalidArgument, match="is not a safe file name"):
        manager.get_key(key_id)
    with pytest.raises(InvalidArgument, match="is not a safe file name"):
        manager.delete_key(key_id)


def test_disk_sees_a_key_replaced_by_another_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_KEK", KEK)
    one = load_key_manager("disk", {}, tmp_path)
    two = load_key_manager("disk", {}, tmp_path)
    one.generate_key("k", KeyType.EC_P256)
    assert two.get_key("k").public_key() == one.get_key("k").public_key()
    replaced = one.generate_key("k", KeyType.EC_P256)
    assert two.get_key("k").public_key() == replaced.public_key()


def test_no_key_material_is_logged(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("TESSERA_KEK", KEK)
    caplog.set_level(logging.DEBUG)
    manager = load_key_manager("disk", {}, tmp_path)
    manager.generate_key("k", KeyType.EC_P256)
    manager.get_key("k")
    manager.delete_key("k")
    assert "generated ec-p256 key 'k'" in caplog.text
    assert KEK not in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_hvac_is_imported_only_when_a_vault_plugin_is_loaded(tmp_path):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from ca.keymanager import KEY_MANAGERS, load_key_manager\n"
        "from ca.upstream import UPSTREAM_AUTHORITIES\n"
        f"load_key_manager('memory', {{}}, Path({str(tmp_path)!r}))\n"
        "assert 'hvac' not in sys.modules, 'hvac without a Vault plugin'\n"
        "KEY_MANAGERS.plugin('vault_transit')\n"
        "print('hvac' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout == "True\n"
