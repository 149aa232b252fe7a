"""The vault_transit key manager against a real ``bao server -dev``: keys made, read, used to
sign certificates and JWT-SVIDs, and every refusal said in words."""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding
from spiffe import JwtBundle, SpiffeId

from ca.jwtsvid import mint_jwt_svid
from ca.keymanager import load_key_manager
from ca.keymanager.vault_transit import TransitSigner, VaultTransitKeyManager
from ca.x509ca import build_ca_certificate, build_x509_svid
from sdk.clock import ManualClock
from sdk.errors import ConfigError, NotFound, PermissionDenied, Unauthenticated, Unavailable
from sdk.jwtsvid import parse_and_validate_jwt_svid
from sdk.keys import KeyType, generate_private_key, hash_for
from tests.conftest import OpenBao
from tests.unit.ca.conftest import TRUST_DOMAIN

pytestmark = pytest.mark.openbao

WEB = SpiffeId("spiffe://example.org/web")
TRANSIT_TYPES = {
    KeyType.EC_P256: "ecdsa-p256",
    KeyType.EC_P384: "ecdsa-p384",
    KeyType.RSA_2048: "rsa-2048",
    KeyType.RSA_4096: "rsa-4096",
}


def transit_policy(mount: str, *, sign: bool = True) -> str:
    policy = f'path "{mount}/keys/tessera-*" {{ capabilities = ["read", "update", "delete"] }}\n'
    if sign:
        policy += f'path "{mount}/sign/tessera-*" {{ capabilities = ["update"] }}\n'
    return policy


@pytest.fixture
def transit_mount(openbao: OpenBao) -> str:
    return openbao.enable_transit()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def make_manager(
    openbao: OpenBao, transit_mount: str, data_dir: Path
) -> Any:
    def make(**settings: Any) -> VaultTransitKeyManager:
        config = {"address": openbao.address, "token": openbao.root_token,
                  "mount": transit_mount, **settings}
        config = {key: value for key, value in config.items() if value is not None}
        manager = load_key_manager("vault_transit", config, data_dir)
        assert isinstance(manager, VaultTransitKeyManager)
        return manager

    return make


@pytest.fixture
def manager(make_manager: Any) -> VaultTransitKeyManager:
    return make_manager()  # type: ignore[no-any-return]


def verify(signer: TransitSigner, data: bytes, signature: bytes) -> None:
    public_key = signer.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hash_for(signer.key_type)))
    else:
        public_key.verify(signature, data, padding.PKCS1v15(), hash_for(signer.key_type))


# -- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(KeyType))
def test_generate_get_and_sign_for_each_key_type(
    key_type: KeyType, manager: VaultTransitKeyManager, make_manager: Any,
    openbao_client: Any, transit_mount: str,
) -> None:
    signer = manager.generate_key("x509-a", key_type)
    assert signer.key_type is key_type
    assert signer.local_private_key() is None

    stored = openbao_client.read(f"{transit_mount}/keys/tessera-x509-a")["data"]
    assert stored["type"] == TRANSIT_TYPES[key_type]
    assert stored["exportable"] is False

    again = make_manager().get_key("x509-a")  # a fresh manager asks bao, not its memory
    assert again.public_key() == signer.public_key()
    assert again.key_version == 1

    data = b"to be signed"
    verify(signer, data, again.sign(data))


def test_generating_an_existing_id_replaces_the_key(manager: VaultTransitKeyManager) -> None:
    first = manager.generate_key("jwt-a", KeyType.EC_P256)
    second = manager.generate_key("jwt-a", KeyType.EC_P384)
    assert second.public_key() != first.public_key()
    assert manager.get_key("jwt-a").key_type is KeyType.EC_P384


def test_deleted_and_unknown_keys_are_not_found(
    manager: VaultTransitKeyManager, make_manager: Any, openbao: OpenBao, transit_mount: str
) -> None:
    signer = manager.generate_key("x509-gone", KeyType.EC_P256)
    manager.delete_key("x509-gone")
    manager.delete_key("x509-gone")  # nothing happens the second time
    with pytest.raises(NotFound) as caught:
        make_manager().get_key("x509-gone")
    assert caught.value.message == (
        "key manager 'vault_transit' has no key with id 'x509-gone' (transit key "
        f"{transit_mount}/keys/tessera-x509-gone at {openbao.address})"
    )
    with pytest.raises(NotFound):
        signer.sign(b"data")


def test_an_unsafe_key_id_is_refused(manager: VaultTransitKeyManager) -> None:
    with pytest.raises(Exception, match="cannot be part of a transit key name"):
        manager.get_key("../sys/seal")


def test_keys_never_touch_the_data_dir(manager: VaultTransitKeyManager, data_dir: Path) -> None:
    signer = manager.generate_key("x509-a", KeyType.EC_P256)
    signer.sign(b"data")
    manager.get_key("x509-a")
    assert list(data_dir.rglob("*")) == []


# -- certificates and JWT-SVIDs --------------------------------------------------------------


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_ca_and_x509_svid_signed_in_transit_verify_with_openssl(
    key_type: KeyType, manager: VaultTransitKeyManager, openssl_verify: Any, pkilint: Any
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    signer = manager.generate_key("x509-a", key_type)
    authority = build_ca_certificate(
        trust_domain=TRUST_DOMAIN, public_key=signer.public_key(), signer=signer,
        issuer=None, not_before=now - timedelta(seconds=10), not_after=now + timedelta(hours=1),
    )
    workload_key = generate_private_key(KeyType.EC_P256)
    svid = build_x509_svid(
        spiffe_id=WEB, public_key=workload_key.public_key(), ca_certificate=authority,
        signer=signer, now=now, ttl=timedelta(minutes=5),
    )
    result = openssl_verify([authority], svid, at=now + timedelta(seconds=1))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")
    assert pkilint(authority) == []
    usage = authority.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_jwt_svid_signed_in_transit_validates(
    key_type: KeyType, manager: VaultTransitKeyManager
) -> None:
    now = datetime.now(UTC)
    signer = manager.generate_key("jwt-a", key_type)
    token = mint_jwt_svid(
        spiffe_id=WEB, audience=["db"], signer=signer, kid="k1", now=now,
        ttl=timedelta(minutes=5),
    )
    bundle = JwtBundle(WEB.trust_domain, {"k1": signer.public_key()})
    validated = parse_and_validate_jwt_svid(token, bundle, "db", clock=ManualClock(now))
    assert validated.spiffe_id == WEB


# -- logging in ---------------------------------------------------------------------------


def test_approle_login_with_a_policy_limited_to_the_plugin(
    openbao: OpenBao, transit_mount: str, make_manager: Any, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mount, role_id, secret_id = openbao.approle(transit_policy(transit_mount))
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id + "\n")
    caplog.set_level(logging.DEBUG)
    manager = make_manager(token=None, approle_role_id=role_id,
                           approle_secret_id_file=str(secret_file), approle_mount=mount)
    signer = manager.generate_key("x509-a", KeyType.EC_P256)
    verify(signer, b"data", signer.sign(b"data"))
    token = manager._client._token()  # private: only to prove it is never logged
    assert token
    for secret in (secret_id, token, openbao.root_token):
        assert secret not in caplog.text


def test_approle_logs_in_again_when_its_token_runs_out(
    openbao: OpenBao, transit_mount: str, make_manager: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    # Each token may make two requests; then bao refuses it, as it would an expired one.
    mount, role_id, secret_id = openbao.approle(transit_policy(transit_mount), token_num_uses=2)
    caplog.set_level(logging.INFO, logger="ca.vault")
    manager = make_manager(token=None, approle_role_id=role_id, approle_secret_id=secret_id,
                           approle_mount=mount)
    signer = manager.generate_key("x509-a", KeyType.EC_P256)  # read + create: two uses
    for _ in range(3):
        verify(signer, b"data", signer.sign(b"data"))
    logins = [r for r in caplog.records if "logged in to Vault/OpenBao" in r.getMessage()]
    assert len(logins) >= 2


def test_a_wrong_secret_id_is_unauthenticated(
    openbao: OpenBao, transit_mount: str, make_manager: Any
) -> None:
    mount, role_id, _ = openbao.approle(transit_policy(transit_mount))
    manager = make_manager(token=None, approle_role_id=role_id,
                           approle_secret_id="not-the-secret", approle_mount=mount)
    with pytest.raises(Unauthenticated) as caught:
        manager.get_key("x509-a")
    assert caught.value.message == (
        f"AppRole login to Vault/OpenBao at {openbao.address} (auth/{mount}/login) failed "
        "(invalid role or secret ID); check approle_role_id, the secret id (it may have "
        "expired or been used up) and approle_mount"
    )
    assert "not-the-secret" not in caught.value.message


def test_a_token_file_is_read_again_after_a_refusal(
    openbao: OpenBao, transit_mount: str, make_manager: Any, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(openbao.token(transit_policy(transit_mount)))
    manager = make_manager(token=None, token_file=str(token_file))
    signer = manager.generate_key("x509-a", KeyType.EC_P256)
    openbao.client().auth.token.revoke(token_file.read_text())
    token_file.write_text(openbao.token(transit_policy(transit_mount)))  # the agent renews it
    verify(signer, b"data", signer.sign(b"data"))


# -- refusals -------------------------------------------------------------------------------


def test_a_policy_without_sign_is_permission_denied_naming_the_policy(
    openbao: OpenBao, transit_mount: str, make_manager: Any
) -> None:
    token = openbao.token(transit_policy(transit_mount, sign=False))
    manager = make_manager(token=token)
    signer = manager.generate_key("x509-a", KeyType.EC_P256)
    with pytest.raises(PermissionDenied) as caught:
        signer.sign(b"data")
    assert caught.value.message == (
        f"Vault/OpenBao at {openbao.address} denied update on {transit_mount}/sign/"
        "tessera-x509-a (permission denied); the token of key manager 'vault_transit' needs "
        f'a policy with path "{transit_mount}/sign/tessera-*" {{ capabilities = ["update"] }} '
        "(or it has expired)"
    )
    assert token not in caught.value.message


def test_an_unreachable_address_is_unavailable(data_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = load_key_manager(
        "vault_transit", {"address": f"http://127.0.0.1:{port}", "token": "t", "timeout": 2},
        data_dir,
    )
    with pytest.raises(Unavailable) as caught:
        manager.get_key("x509-a")
    assert caught.value.message == (
        f"Vault/OpenBao at http://127.0.0.1:{port} is unreachable: connection refused; check "
        "address and that it is unsealed"
    )


def test_a_missing_mount_is_a_config_error(openbao: OpenBao, make_manager: Any) -> None:
    manager = make_manager(mount="nothing-here")
    with pytest.raises(ConfigError) as caught:
        manager.get_key("x509-a")
    assert caught.value.message == (
        f"Vault/OpenBao at {openbao.address} has no secrets engine that answers "
        "nothing-here/keys/tessera-x509-a; check the mount setting of key manager "
        "'vault_transit' and that the engine is enabled there"
    )


def test_unknown_settings_are_refused(data_dir: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_key_manager("vault_transit", {"adress": "http://x"}, data_dir)
    assert caught.value.message == (
        "[key_manager.vault_transit] adress: unknown setting; known settings: address, "
        "approle_mount, approle_role_id, approle_secret_id, approle_secret_id_file, ca_cert, "
        "key_prefix, mount, namespace, timeout, token, token_file"
    )
