"""The vault_pki upstream authority against a real ``bao server -dev``: a PKI mount signs the
server's authorities, X509-SVIDs chain to bao's root, and the bundle publishes that root."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from spiffe import SpiffeId

from ca.authority import X509, Authorities, AuthorityPolicy
from ca.datastore import Datastore
from ca.keymanager import KeyManager, LocalSigner, load_key_manager
from ca.upstream import MintedCA, UpstreamAuthority, load_upstream_authority
from ca.upstream.vault_pki import VaultPkiUpstreamAuthority
from ca.x509ca import build_csr_with_signer
from sdk.clock import ManualClock
from sdk.errors import FailedPrecondition, PermissionDenied
from sdk.keys import KeyType, generate_private_key
from tests.conftest import OpenBao, PkiMount
from tests.unit.ca.conftest import TRUST_DOMAIN

pytestmark = pytest.mark.openbao

WEB = SpiffeId("spiffe://example.org/web")
CA_TTL = timedelta(hours=24)


@pytest.fixture
def pki(openbao: OpenBao) -> PkiMount:
    return openbao.enable_pki()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def make_upstream(openbao: OpenBao, pki: PkiMount, data_dir: Path) -> Any:
    def make(**settings: Any) -> VaultPkiUpstreamAuthority:
        config = {"address": openbao.address, "token": openbao.root_token,
                  "mount": pki.mount, **settings}
        config = {key: value for key, value in config.items() if value is not None}
        upstream = load_upstream_authority("vault_pki", config, data_dir)
        assert isinstance(upstream, VaultPkiUpstreamAuthority)
        return upstream

    return make


@pytest.fixture
def clock() -> ManualClock:
    """Real time: bao stamps notBefore with its own clock."""
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def store(sqlite_url: str, clock: ManualClock) -> Iterator[Datastore]:
    with Datastore.open(sqlite_url, clock=clock) as opened:
        yield opened


def root_of(pki: PkiMount) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.root_pem.encode())


def mint(upstream: UpstreamAuthority, now: datetime, *,
         lifetime: timedelta = CA_TTL, key_type: KeyType = KeyType.EC_P256) -> MintedCA:
    signer = LocalSigner("x509-a", generate_private_key(key_type))
    return upstream.mint_x509_ca(
        trust_domain=TRUST_DOMAIN, public_key=signer.public_key(), not_before=now,
        not_after=now + lifetime, signer=signer,
    )


# -- through the server's authorities -----------------------------------------------------


@pytest.mark.parametrize("key_manager", ["memory", "vault_transit"])
def test_authorities_rotate_and_issue_svids_that_chain_to_the_bao_root(
    key_manager: str, openbao: OpenBao, pki: PkiMount, make_upstream: Any, store: Datastore,
    clock: ManualClock, data_dir: Path, openssl_verify: Any,
) -> None:
    settings: dict[str, Any] = {}
    if key_manager == "vault_transit":
        settings = {"address": openbao.address, "token": openbao.root_token,
                    "mount": openbao.enable_transit()}
    keys: KeyManager = load_key_manager(key_manager, settings, data_dir)
    authorities = Authorities(
        AuthorityPolicy(trust_domain=TRUST_DOMAIN, server_id="server-a", ca_ttl=CA_TTL),
        store, keys, upstream=make_upstream(), clock=clock,
    )
    assert authorities.rotate()
    root = root_of(pki)
    assert authorities.bundle().x509_authorities == (root,)

    workload_key = generate_private_key(KeyType.EC_P256)
    leaf, intermediates, record = authorities.sign_x509_svid(
        WEB, workload_key.public_key(), ttl=timedelta(hours=1)
    )
    intermediate = authorities.active(X509).certificate
    assert intermediates == (intermediate,)
    assert intermediate is not None
    assert intermediate.issuer == root.subject
    assert record.not_after == intermediate.not_valid_after_utc
    result = openssl_verify([root], leaf, intermediates, at=clock.now() + timedelta(seconds=1))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")

    extensions = intermediate.extensions
    assert extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert intermediate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[
        0].value == "example.org"
    if key_manager == "vault_transit":
        assert list(data_dir.rglob("*")) == []

    # Half-way through its life the next authority is prepared, signed by bao too; the
    # bundle still holds the one root.
    clock.advance(CA_TTL / 2 + timedelta(minutes=1))
    assert authorities.rotate()
    assert len(authorities.list_authorities(X509)) == 2
    assert authorities.bundle().x509_authorities == (root,)


# -- minting ----------------------------------------------------------------------------------


def test_the_minted_authority_is_a_spiffe_ca_for_the_key(
    make_upstream: Any, pki: PkiMount, clock: ManualClock
) -> None:
    now = clock.now()
    minted = mint(make_upstream(), now)
    certificate = minted.certificate
    assert minted.upstream_roots == (root_of(pki),)
    assert minted.chain == ()
    assert certificate.not_valid_after_utc == now + CA_TTL
    assert certificate.not_valid_before_utc <= now
    names = {attribute.oid: attribute.value for attribute in certificate.subject}
    assert names[NameOID.ORGANIZATION_NAME] == "Tessera"
    assert names[NameOID.COMMON_NAME].startswith("authority ")


def test_ttl_cap_shortens_the_authority(make_upstream: Any, clock: ManualClock) -> None:
    now = clock.now()
    minted = mint(make_upstream(ttl_cap="2h"), now)
    assert minted.certificate.not_valid_after_utc == now + timedelta(hours=2)


def test_an_authority_never_outlives_the_issuer(
    openbao: OpenBao, data_dir: Path, clock: ManualClock
) -> None:
    short = openbao.enable_pki(ttl="3h")
    upstream = load_upstream_authority(
        "vault_pki",
        {"address": openbao.address, "token": openbao.root_token, "mount": short.mount},
        data_dir,
    )
    minted = mint(upstream, clock.now())
    assert minted.certificate.not_valid_after_utc == root_of(short).not_valid_after_utc

    later = root_of(short).not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(FailedPrecondition) as caught:
        mint(upstream, later)
    assert caught.value.message == (
        f"the issuer of PKI mount {short.mount} at {openbao.address} expired at "
        f"{root_of(short).not_valid_after_utc.isoformat()}; renew it before the server can "
        "rotate"
    )


def test_rsa_root_signs_an_ec_authority_and_an_rsa_one(
    openbao: OpenBao, data_dir: Path, clock: ManualClock
) -> None:
    rsa_pki = openbao.enable_pki(key_type="rsa", key_bits=2048)
    upstream = load_upstream_authority(
        "vault_pki",
        {"address": openbao.address, "token": openbao.root_token, "mount": rsa_pki.mount},
        data_dir,
    )
    for key_type in (KeyType.EC_P384, KeyType.RSA_2048):
        minted = mint(upstream, clock.now(), key_type=key_type)
        minted.certificate.verify_directly_issued_by(root_of(rsa_pki))


def test_issuer_ref_chooses_the_issuer(
    openbao: OpenBao, pki: PkiMount, make_upstream: Any, clock: ManualClock
) -> None:
    second = x509.load_pem_x509_certificate(
        openbao.generate_root(pki.mount, issuer_name="second").encode()
    )
    minted = mint(make_upstream(issuer_ref="second"), clock.now())
    assert minted.upstream_roots == (second,)
    minted.certificate.verify_directly_issued_by(second)


def test_the_policy_in_the_docs_is_enough_with_approle(
    openbao: OpenBao, pki: PkiMount, make_upstream: Any, clock: ManualClock
) -> None:
    policy = f'path "{pki.mount}/root/sign-intermediate" {{ capabilities = ["update"] }}'
    mount, role_id, secret_id = openbao.approle(policy)
    upstream = make_upstream(token=None, approle_role_id=role_id, approle_secret_id=secret_id,
                             approle_mount=mount)
    assert mint(upstream, clock.now()).upstream_roots == (root_of(pki),)


# -- refusals -------------------------------------------------------------------------------


def test_a_token_without_sign_intermediate_is_permission_denied(
    openbao: OpenBao, pki: PkiMount, make_upstream: Any, clock: ManualClock
) -> None:
    token = openbao.token(f'path "{pki.mount}/cert/*" {{ capabilities = ["read"] }}')
    with pytest.raises(PermissionDenied) as caught:
        mint(make_upstream(token=token), clock.now())
    assert caught.value.message == (
        f"Vault/OpenBao at {openbao.address} denied update on {pki.mount}/root/"
        "sign-intermediate (permission denied); the token of upstream authority 'vault_pki' "
        f'needs a policy with path "{pki.mount}/root/sign-intermediate" {{ capabilities = '
        '["update"] } (or it has expired)'
    )


def test_a_mount_without_a_root_says_how_to_make_one(
    openbao: OpenBao, data_dir: Path, clock: ManualClock
) -> None:
    bare = openbao.enable_pki(root=False)
    upstream = load_upstream_authority(
        "vault_pki",
        {"address": openbao.address, "token": openbao.root_token, "mount": bare.mount},
        data_dir,
    )
    with pytest.raises(FailedPrecondition) as caught:
        mint(upstream, clock.now())
    assert caught.value.message == (
        f"PKI mount {bare.mount} at {openbao.address} has no usable issuer 'default' (no "
        "default issuer currently configured); generate or import a root first (e.g. `bao "
        f'write {bare.mount}/root/generate/internal common_name="Example Root"`) or set '
        "issuer_ref"
    )


def test_minting_needs_the_signer(make_upstream: Any, clock: ManualClock) -> None:
    key = generate_private_key(KeyType.EC_P256)
    with pytest.raises(FailedPrecondition) as caught:
        make_upstream().mint_x509_ca(
            trust_domain=TRUST_DOMAIN, public_key=key.public_key(), not_before=clock.now(),
            not_after=clock.now() + CA_TTL,
        )
    assert caught.value.message == (
        "upstream authority 'vault_pki' needs the new authority's signer to sign a CSR, "
        "and none was given"
    )


# -- the CSR ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_a_remote_signer_signs_a_valid_csr_for_its_own_key(
    key_type: KeyType, remote_signer: Any, key_pool: Any
) -> None:
    signer = remote_signer("x509-a", key_pool(key_type))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authority 1")])
    csr = build_csr_with_signer(subject, signer)
    assert csr.is_signature_valid
    assert csr.public_key() == signer.public_key()
    assert csr.subject == subject
    assert signer.signed == 1
