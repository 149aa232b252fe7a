"""Connection settings shared by the Vault/OpenBao plugins: parsed and refused with reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from ca.vault import AppRoleLogin, StaticToken, TokenFile, VaultSettings
from sdk.errors import ConfigError

PLUGIN = "key manager 'vault_transit'"
ADDRESS = "https://vault.example.org:8200"


def settings(config: dict[str, object], **environ: str) -> VaultSettings:
    return VaultSettings.from_config(config, plugin=PLUGIN, environ=environ)


def test_token_and_address_come_from_the_environment_when_not_set() -> None:
    parsed = settings({}, VAULT_ADDR=ADDRESS + "/", VAULT_TOKEN="s.env")
    assert parsed.address == ADDRESS
    assert parsed.credentials == StaticToken("s.env", "the VAULT_TOKEN environment variable")
    assert parsed.timeout == 10.0


def test_openbao_variables_are_read_too() -> None:
    parsed = settings({}, BAO_ADDR=ADDRESS, BAO_TOKEN="s.bao")
    assert parsed.address == ADDRESS
    assert parsed.credentials == StaticToken("s.bao", "the BAO_TOKEN environment variable")


def test_the_config_wins_over_the_environment() -> None:
    parsed = settings(
        {"address": "http://127.0.0.1:8200", "token": "s.config", "timeout": "1m"},
        VAULT_ADDR=ADDRESS,
        VAULT_TOKEN="s.env",
    )
    assert parsed.address == "http://127.0.0.1:8200"
    assert parsed.credentials == StaticToken("s.config", "the token setting")
    assert parsed.timeout == 60.0


def test_approle_with_a_secret_id_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret-id"
    secret_file.write_text("the-secret\n")
    parsed = settings(
        {
            "address": ADDRESS,
            "approle_role_id": "role-1",
            "approle_secret_id_file": str(secret_file),
            "approle_mount": "/tessera-approle/",
        },
        VAULT_TOKEN="ignored",
    )
    assert parsed.credentials == AppRoleLogin("role-1", None, secret_file, "tessera-approle")
    assert isinstance(parsed.credentials, AppRoleLogin)
    assert parsed.credentials.secret() == "the-secret"


def test_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s.file\n")
    parsed = settings({"address": ADDRESS, "token_file": str(token_file)})
    assert parsed.credentials == TokenFile(token_file)
    assert TokenFile(token_file).read() == "s.file"


def test_secrets_are_not_in_the_repr() -> None:
    parsed = settings(
        {"address": ADDRESS, "approle_role_id": "role-1", "approle_secret_id": "secret-xyz"}
    )
    assert "secret-xyz" not in repr(parsed)
    assert "s.hidden" not in repr(settings({"address": ADDRESS, "token": "s.hidden"}))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"token": "t"},
            "key manager 'vault_transit' does not know where Vault/OpenBao is; set address "
            '(e.g. "https://vault.example.org:8200") or VAULT_ADDR',
        ),
        (
            {"address": "vault:8200", "token": "t"},
            "key manager 'vault_transit' address 'vault:8200' is not an http:// or https:// URL",
        ),
        (
            {"address": ADDRESS},
            "key manager 'vault_transit' has no Vault/OpenBao credentials; set token_file (or "
            "token, or VAULT_TOKEN), or approle_role_id with approle_secret_id_file",
        ),
        (
            {"address": ADDRESS, "token": "t", "approle_role_id": "r"},
            "key manager 'vault_transit' has more than one way to log in (token and AppRole); "
            "set only one of token, token_file or approle_role_id",
        ),
        (
            {"address": ADDRESS, "approle_role_id": "r"},
            "key manager 'vault_transit' logs in with AppRole but has no secret id; set "
            "approle_secret_id_file (or approle_secret_id)",
        ),
        (
            {"address": ADDRESS, "approle_secret_id": "s"},
            "key manager 'vault_transit' has an AppRole secret id but no approle_role_id; set it",
        ),
        (
            {"address": ADDRESS, "token": "t", "timeout": "soon"},
            "key manager 'vault_transit' timeout: 'soon' is not a duration; write seconds or a "
            "number with s, m, h or d, e.g. 90s, 15m, 1h, 24h",
        ),
        (
            {"address": ADDRESS, "token": "t", "ca_cert": "/nonexistent/ca.pem"},
            "key manager 'vault_transit' ca_cert /nonexistent/ca.pem is not a readable file; "
            "point it at the PEM CA certificate that signed Vault/OpenBao's TLS certificate",
        ),
        (
            {"address": ADDRESS, "token": 42},
            "key manager 'vault_transit' token: must be a string",
        ),
        (
            {"address": ADDRESS, "approle_role_id": "r", "approle_secret_id": ["s3cret"]},
            "key manager 'vault_transit' approle_secret_id: must be a string",
        ),
        (
            {"address": ADDRESS, "token": "t", "timeout": True},
            "key manager 'vault_transit' timeout: must be seconds or a duration such as 10s, "
            "got True",
        ),
    ],
)
def test_bad_settings_say_what_to_fix(config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(config)
    assert caught.value.message == message


def test_an_unreadable_token_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        TokenFile(tmp_path / "missing").read()
    assert caught.value.message == (
        f"cannot read the Vault/OpenBao token file {tmp_path / 'missing'} (No such file or "
        "directory); check the token_file setting and the file's permissions"
    )
