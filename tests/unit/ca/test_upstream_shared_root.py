"""The ``shared_root`` upstream authority: one root in the datastore for every server.

Two "servers" are two Authorities on one real store (SQLite, and PostgreSQL through
``datastore_url``), each with its own memory key manager and its own
SharedRootUpstreamAuthority, sharing a KEK; a ManualClock drives the root's life.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from spiffe import SpiffeId

from ca.authority import X509, Authorities, AuthorityPolicy
from ca.datastore import Datastore
from ca.keymanager import load_key_manager
from ca.keymanager.disk import Kek
from ca.upstream import UpstreamContext, load_upstream_authority
from ca.upstream.shared_root import SharedRootUpstreamAuthority
from sdk.clock import ManualClock
from sdk.errors import ConfigError
from sdk.keys import KeyType, generate_private_key
from tests.unit.ca.conftest import TRUST_DOMAIN

CA_TTL = timedelta(hours=6)
ROOT_TTL = timedelta(days=2)
KEK = "5f0c1a7e9d2b4c6a8e0f1b3d5c7e9a1b"
WEB = SpiffeId("spiffe://example.org/web")


@pytest.fixture
def store(datastore_url: str, clock: ManualClock) -> Iterator[Datastore]:
    with Datastore.open(datastore_url, clock=clock) as opened:
        yield opened


def shared_root(store: Datastore, clock: ManualClock, kek: str = KEK,
                **settings: Any) -> SharedRootUpstreamAuthority:  # fmt: skip
    return SharedRootUpstreamAuthority(store, Kek(kek.encode(), "the test KEK"),
                                       root_ttl=ROOT_TTL, clock=clock, **settings)  # fmt: skip


def server(store: Datastore, clock: ManualClock, tmp_path: Path, server_id: str,
           kek: str = KEK) -> Authorities:  # fmt: skip
    policy = AuthorityPolicy(trust_domain=TRUST_DOMAIN, server_id=server_id, ca_ttl=CA_TTL)
    keys = load_key_manager("memory", {}, tmp_path)
    return Authorities(policy, store, keys, upstream=shared_root(store, clock, kek), clock=clock)


def ski(certificate: x509.Certificate) -> bytes:
    return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def svid(cas: Authorities) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
    key = generate_private_key(KeyType.EC_P256)
    leaf, intermediates, _ = cas.sign_x509_svid(WEB, key.public_key(), ttl=timedelta(hours=1))
    return leaf, intermediates


def test_every_server_signs_under_the_one_shared_root(
    store: Datastore, clock: ManualClock, tmp_path: Path,
    openssl_verify: Callable[..., Any], pkilint: Callable[[x509.Certificate], list[str]],
) -> None:  # fmt: skip
    a, b = (server(store, clock, tmp_path, name) for name in ("server-a", "server-b"))
    a.rotate()
    b.rotate()

    [root] = store.list_shared_roots()
    root_certificate = x509.load_der_x509_certificate(root.certificate)
    assert root.encrypted_key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert a.active(X509).record.authority_id != b.active(X509).record.authority_id
    for cas in (a, b):
        assert [ski(c) for c in cas.bundle().x509_authorities] == [ski(root_certificate)]
        leaf, intermediates = svid(cas)
        assert intermediates == (cas.active(X509).certificate,)
        verified = openssl_verify([root_certificate], leaf, intermediates)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert pkilint(intermediates[0]) == []
    assert pkilint(root_certificate) == []


def test_a_server_that_read_no_root_and_lost_the_race_uses_the_winners(
    store: Datastore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    winner, loser = shared_root(store, clock), shared_root(store, clock)
    winner._current_root(TRUST_DOMAIN)
    reads = [0]
    list_roots = store.list_shared_roots

    def stale_first_read() -> list[Any]:
        reads[0] += 1
        return [] if reads[0] == 1 else list_roots()

    monkeypatch.setattr(store, "list_shared_roots", stale_first_read)
    chosen = loser._current_root(TRUST_DOMAIN)

    assert chosen.generation == 1
    assert [r.generation for r in list_roots()] == [1]


def test_the_next_root_comes_at_half_life_and_both_stay_trusted_across_the_switch(
    store: Datastore, clock: ManualClock, tmp_path: Path
) -> None:
    cas = server(store, clock, tmp_path, "server-a")
    cas.rotate()
    first_root = store.list_shared_roots()[0]

    def roots_in_bundle() -> list[int]:
        anchors = {ski(c) for c in cas.bundle().x509_authorities}
        return [r.generation for r in store.list_shared_roots()
                if ski(x509.load_der_x509_certificate(r.certificate)) in anchors]  # fmt: skip

    # The server rotates its authority every few hours (ticks of an hour) until the root
    # is past its half life: the next authority prepared is signed by a new root.
    while len(store.list_shared_roots()) == 1:
        clock.advance(timedelta(hours=1))
        cas.rotate()
        assert clock.now() < first_root.not_after, "no second root before the first expired"
    assert clock.now() - first_root.not_before > ROOT_TTL / 2
    statuses = {a.status for a in cas.list_authorities(X509)}
    assert statuses >= {"active", "prepared"}  # published before it signs
    assert roots_in_bundle() == [1, 2]
    old_leaf, old_intermediates = svid(cas)  # the active authority: still under root 1
    assert old_intermediates[0].issuer == x509.load_der_x509_certificate(
        first_root.certificate).subject  # fmt: skip

    # Once the prepared authority signs, its SVIDs chain to root 2; root 1 stays trusted
    # until no live authority is signed by it.
    while svid(cas)[1][0].issuer == old_intermediates[0].issuer:
        clock.advance(timedelta(hours=1))
        cas.rotate()
    second_root = x509.load_der_x509_certificate(store.list_shared_roots()[1].certificate)
    leaf, intermediates = svid(cas)
    intermediates[0].verify_directly_issued_by(second_root)
    leaf.verify_directly_issued_by(intermediates[0])
    assert roots_in_bundle() == [1, 2]
    old_leaf.verify_directly_issued_by(old_intermediates[0])
    clock.advance(CA_TTL)
    cas.rotate()
    assert roots_in_bundle() == [2]


def test_recovering_from_a_compromised_root_as_the_docs_say(
    datastore_url: str, store: Datastore, clock: ManualClock, tmp_path: Path
) -> None:
    cas = server(store, clock, tmp_path, "server-a")
    cas.rotate()
    old_authority = cas.active(X509).record.authority_id
    old_root = ski(cas.bundle().x509_authorities[0])

    engine = sa.create_engine(datastore_url)  # "delete the rows of the shared_roots table"
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("DELETE FROM shared_roots"))
    finally:
        engine.dispose()
    cas.prepare(X509)
    cas.activate(X509)
    new_root = x509.load_der_x509_certificate(store.list_shared_roots()[0].certificate)
    leaf, intermediates = svid(cas)
    intermediates[0].verify_directly_issued_by(new_root)
    leaf.verify_directly_issued_by(intermediates[0])
    assert {ski(c) for c in cas.bundle().x509_authorities} == {old_root, ski(new_root)}

    cas.taint(X509, old_authority)
    cas.revoke(X509, old_authority)
    assert [ski(c) for c in cas.bundle().x509_authorities] == [ski(new_root)]


def test_a_server_with_another_kek_cannot_use_the_root(
    store: Datastore, clock: ManualClock, tmp_path: Path
) -> None:
    server(store, clock, tmp_path, "server-a").rotate()
    other = server(store, clock, tmp_path, "server-b", kek="another-secret-of-32-characters!")

    with pytest.raises(ConfigError) as refused:
        other.rotate()

    assert refused.value.message == (
        "the shared root's key (generation 1) cannot be decrypted with the key-encryption key "
        "from the test KEK; every server of the trust domain needs the same kek_file or "
        "TESSERA_KEK"
    )
    assert store.list_authorities(kind=X509, server_id="server-b") == []


def test_configuration(store: Datastore, clock: ManualClock, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    context = UpstreamContext(datastore=store, clock=clock)
    monkeypatch.delenv("TESSERA_KEK", raising=False)

    def refused(settings: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as caught:
            load_upstream_authority("shared_root", settings, tmp_path, context)
        return caught.value.message

    assert refused({}).startswith(
        "upstream authority 'shared_root' needs the key-encryption key every server of the "
        "trust domain shares: set kek_file, or the TESSERA_KEK environment variable")
    kek_file = tmp_path / "kek"
    kek_file.write_text(KEK + "\n")
    assert refused({"kek_file": str(kek_file), "root_ttl": "soon"}) == (
        "[upstream_authority.shared_root] root_ttl: 'soon' is not a duration; write seconds "
        "or a number with s, m, h or d, e.g. 90s, 15m, 1h, 24h")
    assert refused({"kek_file": str(kek_file), "root_ttl": True}) == (
        "[upstream_authority.shared_root] root_ttl: must be a duration such as \"90s\", "
        "\"15m\" or \"1h\", got True")
    assert refused({"kek_file": str(kek_file), "key_type": "dsa"}).startswith(
        "upstream authority 'shared_root': key type 'dsa' is not supported")
    assert refused({"kek_file": str(kek_file), "root": "x"}) == (
        "[upstream_authority.shared_root] root: unknown setting; "
        "known settings: kek_file, key_type, root_ttl")
    with pytest.raises(ConfigError) as too_short:
        load_upstream_authority("shared_root", {"kek_file": str(kek_file), "root_ttl": "1d"},
                                tmp_path, UpstreamContext(datastore=store, clock=clock,
                                                          ca_ttl=timedelta(hours=24)))  # fmt: skip
    assert too_short.value.message.startswith(
        "upstream authority 'shared_root' setting root_ttl (1d) must be at least twice the CA "
        "TTL (1d), or every authority is cut short by its root; ten times or more is sensible")
    short = tmp_path / "short"
    short.write_text("tiny")
    assert refused({"kek_file": str(short)}).startswith(
        f"the key-encryption key from kek_file {short} is shorter than 16 bytes")

    monkeypatch.setenv("TESSERA_KEK", KEK)
    loaded = load_upstream_authority("shared_root", {"root_ttl": "30d", "key_type": "ec-p384"},
                                     tmp_path, context)  # fmt: skip
    assert isinstance(loaded, SharedRootUpstreamAuthority)
    loaded._current_root(TRUST_DOMAIN)
    [root] = store.list_shared_roots()
    certificate = x509.load_der_x509_certificate(root.certificate)
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc == timedelta(
        days=30, seconds=10)
    assert certificate.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
