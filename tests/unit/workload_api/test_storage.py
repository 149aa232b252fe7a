"""The agent's persisted identity: what survives a restart, with which file modes."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from spiffe import SpiffeId, TrustDomain

from sdk.errors import ConfigError, InvalidArgument
from sdk.keys import KeyType, generate_private_key
from tests.unit.workload_api.agent_helpers import AuthorityForTests, agent_identity_files
from workload_api import storage as storage_module
from workload_api.storage import AgentIdentity, AgentStorage, svid_spiffe_id

NOW = datetime.now(UTC)
TD = TrustDomain("example.org")


@pytest.fixture
def authority() -> AuthorityForTests:
    return AuthorityForTests("example.org", NOW)


def identity(authority: AuthorityForTests) -> AgentIdentity:
    leaf, key = agent_identity_files(authority, NOW)
    return AgentIdentity(
        spiffe_id=SpiffeId("spiffe://example.org/tessera/agent/join_token/0123456789abcdef0123"),
        chain=(leaf,),
        private_key=key,
        attestation_type="join_token",
        reattestable=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_identity_and_bundle_survive_a_restart(
    tmp_path: Path, authority: AuthorityForTests
) -> None:
    storage = AgentStorage(tmp_path / "agent")
    storage.prepare()
    assert storage.load_identity(TD) is None
    assert storage.load_bundle(TD) is None
    saved = identity(authority)
    storage.save_identity(saved)
    storage.save_bundle(authority.bundle)

    loaded = AgentStorage(tmp_path / "agent").load_identity(TD)
    assert loaded is not None
    assert loaded.spiffe_id == saved.spiffe_id
    assert loaded.chain == saved.chain
    assert loaded.private_key.public_key() == saved.private_key.public_key()
    assert (loaded.attestation_type, loaded.reattestable) == ("join_token", False)
    assert storage.load_bundle(TD) == authority.bundle


def test_the_data_dir_is_private_and_the_key_0600(
    tmp_path: Path, authority: AuthorityForTests
) -> None:
    data_dir = tmp_path / "agent"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    storage = AgentStorage(data_dir)
    storage.prepare()
    storage.save_identity(identity(authority))
    assert mode(data_dir) == 0o700
    assert mode(data_dir / "agent-svid.key") == 0o600
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "agent-svid.key", "agent-svid.pem", "agent.json",
    ]


def test_the_renewal_point_is_half_life(authority: AuthorityForTests) -> None:
    saved = identity(authority)
    assert saved.renew_at == saved.not_before + (saved.expires_at - saved.not_before) / 2
    assert not saved.expired(NOW)
    assert saved.expired(saved.expires_at)


def test_a_key_that_does_not_match_the_svid_is_refused(
    tmp_path: Path, authority: AuthorityForTests
) -> None:
    storage = AgentStorage(tmp_path)
    saved = identity(authority)
    storage.save_identity(saved)
    other = AgentIdentity(
        spiffe_id=saved.spiffe_id,
        chain=saved.chain,
        private_key=generate_private_key(KeyType.EC_P256),
        attestation_type="join_token",
        reattestable=False,
    )
    storage.save_identity(other)
    with pytest.raises(ConfigError) as caught:
        storage.load_identity(TD)
    assert caught.value.message == (
        f"the agent's key and SVID in {tmp_path} do not belong together; remove agent.json, "
        "agent-svid.pem and agent-svid.key there and attest again"
    )


def test_an_identity_of_another_trust_domain_is_refused(
    tmp_path: Path, authority: AuthorityForTests
) -> None:
    storage = AgentStorage(tmp_path)
    storage.save_identity(identity(authority))
    with pytest.raises(ConfigError) as caught:
        storage.load_identity(TrustDomain("other.test"))
    assert caught.value.message == (
        f"the data directory {tmp_path} holds the identity of an agent of trust domain "
        "example.org, not other.test; use another --data-dir"
    )


def test_an_unreadable_identity_says_how_to_recover(
    tmp_path: Path, authority: AuthorityForTests
) -> None:
    storage = AgentStorage(tmp_path)
    storage.save_identity(identity(authority))
    (tmp_path / "agent-svid.pem").write_text("garbage")
    with pytest.raises(ConfigError) as caught:
        storage.load_identity(TD)
    assert "remove agent.json, agent-svid.pem and agent-svid.key there" in caught.value.message


def failing_write(code: int) -> Callable[..., None]:
    """The write helper on a read-only filesystem or a full disk."""

    def write(path: Path, content: bytes, mode: int) -> None:
        raise OSError(code, os.strerror(code), str(path))

    return write


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_prepare_says_when_the_data_dir_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    monkeypatch.setattr(storage_module, "write_file_atomically", failing_write(code))
    with pytest.raises(ConfigError) as caught:
        AgentStorage(tmp_path / "agent").prepare()
    assert caught.value.message == (
        f"the agent cannot write to its data directory {tmp_path / 'agent'} "
        f"({os.strerror(code)}); give it a --data-dir on a writable filesystem with free space"
    )


def test_prepare_leaves_no_probe_behind(tmp_path: Path) -> None:
    AgentStorage(tmp_path / "agent").prepare()
    assert list((tmp_path / "agent").iterdir()) == []


def test_a_write_that_fails_later_is_a_sentence_and_leaves_the_old_files(
    tmp_path: Path, authority: AuthorityForTests, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = AgentStorage(tmp_path)
    storage.save_bundle(authority.bundle)
    monkeypatch.setattr(storage_module, "write_file_atomically", failing_write(errno.ENOSPC))
    with pytest.raises(ConfigError) as caught:
        storage.save_bundle(AuthorityForTests("example.org", NOW).bundle)
    assert caught.value.message.startswith(
        f"the agent cannot write to its data directory {tmp_path} (No space left on device)"
    )
    assert storage.load_bundle(TD) == authority.bundle


# -- the SPIFFE ID of a stored SVID ---------------------------------------------------------


def certificate_naming(*uris: str) -> x509.Certificate:
    """A self-signed certificate whose URI SANs are ``uris`` (none: no SAN extension)."""
    key = generate_private_key(KeyType.EC_P256)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stored")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + timedelta(hours=1))
    )
    if uris:
        names = [x509.UniformResourceIdentifier(uri) for uri in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_the_spiffe_id_of_a_stored_svid() -> None:
    agent = "spiffe://example.org/tessera/agent/join_token/one"

    assert svid_spiffe_id(certificate_naming(agent)) == SpiffeId(agent)


@pytest.mark.parametrize(
    ("uris", "message"),
    [
        ((), "the certificate is not an X509-SVID: it needs exactly one URI SAN"),
        (("spiffe://example.org/a", "spiffe://example.org/b"),
         "the certificate is not an X509-SVID: it needs exactly one URI SAN"),
        (("https://example.org/agent",),
         "certificate URI SAN 'https://example.org/agent' is not valid: does not start with "
         "'spiffe://'; expected spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web"),
    ],
    ids=["no-uri", "two-uris", "not-spiffe"],
)
def test_a_stored_certificate_that_names_no_one_spiffe_id(
    uris: tuple[str, ...], message: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        svid_spiffe_id(certificate_naming(*uris))

    assert refused.value.message == message
