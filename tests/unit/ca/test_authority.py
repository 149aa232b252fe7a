"""The CA journal and its rotation, driven by a ManualClock over a real SQLite store.

With a 6 h CA TTL (and the 10 s backdate) the first authority lives from
START-10s to START+6h: the next key is prepared once less than half its life
is left (after ~START+3h), activated once less than a sixth is left (after
~START+5h), and the old key leaves the bundle at START+6h.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId

from ca.authority import (
    ACTIVE,
    JWT,
    OLD,
    PREPARED,
    X509,
    Authorities,
    AuthorityPolicy,
)
from ca.datastore import Datastore
from ca.keymanager import KeyManager, LocalSigner, load_key_manager
from ca.upstream import MintedCA
from ca.x509ca import build_ca_certificate
from sdk.clock import ManualClock
from sdk.errors import FailedPrecondition, NotFound
from sdk.keys import KeyType, generate_private_key
from tests.unit.ca.conftest import START, TRUST_DOMAIN

CA_TTL = timedelta(hours=6)
WEB = SpiffeId("spiffe://example.org/web")
BEFORE_HALF = timedelta(hours=2, minutes=59)
PAST_HALF = timedelta(hours=3, minutes=1)
PAST_FIVE_SIXTHS = timedelta(hours=5, minutes=1)
PAST_EXPIRY = timedelta(hours=6, seconds=1)


@pytest.fixture
def store(sqlite_url: str, clock: ManualClock) -> Iterator[Datastore]:
    with Datastore.open(sqlite_url, clock=clock) as opened:
        yield opened


def memory_keys(tmp_path: Path) -> KeyManager:
    return load_key_manager("memory", {}, tmp_path)


def authorities(
    store: Datastore,
    keys: KeyManager,
    clock: ManualClock,
    server_id: str = "server-a",
) -> Authorities:
    policy = AuthorityPolicy(trust_domain=TRUST_DOMAIN, server_id=server_id, ca_ttl=CA_TTL)
    return Authorities(policy, store, keys, upstream=None, clock=clock)


@pytest.fixture
def cas(store: Datastore, clock: ManualClock, tmp_path: Path) -> Authorities:
    return authorities(store, memory_keys(tmp_path), clock)


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def aki(cert: x509.Certificate) -> bytes | None:
    return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier


def bundle_skis(cas: Authorities) -> set[bytes]:
    return {ski(cert) for cert in cas.bundle().x509_authorities}


def sign(cas: Authorities, ttl: timedelta = timedelta(hours=1)) -> x509.Certificate:
    key = generate_private_key(KeyType.EC_P256)
    leaf, intermediates, _ = cas.sign_x509_svid(WEB, key.public_key(), ttl=ttl)
    assert intermediates == ()  # self-signed authorities: the CA is itself the anchor
    return leaf


def statuses(cas: Authorities, kind: str) -> list[str]:
    return [a.status for a in cas.list_authorities(kind)]


def chains_to_bundle(leaf: x509.Certificate, cas: Authorities) -> None:
    """The leaf's issuer is in the bundle and its signature verifies with that anchor."""
    anchors = [c for c in cas.bundle().x509_authorities if ski(c) == aki(leaf)]
    assert len(anchors) == 1, "no authority in the bundle has the leaf's AKI as its SKI"
    assert anchors[0].subject == leaf.issuer
    leaf.verify_directly_issued_by(anchors[0])


# -- the rotation timeline ---------------------------------------------------------------


def test_first_rotate_makes_one_active_x509_and_one_active_jwt_authority(cas, clock):
    assert cas.rotate() is True

    assert statuses(cas, X509) == [ACTIVE]
    assert statuses(cas, JWT) == [ACTIVE]
    bundle = cas.bundle()
    assert len(bundle.x509_authorities) == 1
    assert len(bundle.jwt_authorities) == 1
    active = cas.active(X509)
    assert active.certificate is not None
    assert active.record.authority_id == ski(active.certificate).hex()
    assert active.not_after == START + CA_TTL
    assert list(bundle.jwt_authorities) == [cas.active(JWT).record.authority_id]


def test_rotate_changes_nothing_before_half_life(cas, clock):
    cas.rotate()
    sequence = cas.bundle().sequence
    clock.advance(BEFORE_HALF)

    assert cas.rotate() is False

    assert statuses(cas, X509) == [ACTIVE]
    assert cas.bundle().sequence == sequence


def test_past_half_life_the_next_key_is_prepared_and_published(cas, clock):
    cas.rotate()
    first = cas.active(X509).record.authority_id
    first_jwt = cas.active(JWT).record.authority_id
    sequence = cas.bundle().sequence
    clock.advance(PAST_HALF)

    assert cas.rotate() is True

    assert statuses(cas, X509) == [ACTIVE, PREPARED]
    assert statuses(cas, JWT) == [ACTIVE, PREPARED]
    assert cas.active(X509).record.authority_id == first
    assert cas.active(JWT).record.authority_id == first_jwt
    bundle = cas.bundle()
    assert len(bundle.x509_authorities) == 2
    assert len(bundle.jwt_authorities) == 2
    assert bundle.sequence > sequence
    prepared = next(a for a in cas.list_authorities(X509) if a.status == PREPARED)
    assert aki(sign(cas)).hex() == first  # the prepared key does not sign yet
    assert prepared.authority_id != first


def test_past_five_sixths_the_prepared_key_signs_and_the_old_one_stays_trusted(cas, clock):
    cas.rotate()
    first = cas.active(X509).record.authority_id
    clock.advance(timedelta(hours=1))
    before_switch = sign(cas)
    clock.set(START + PAST_HALF)
    cas.rotate()
    prepared = next(a for a in cas.list_authorities(X509) if a.status == PREPARED)
    sequence = cas.bundle().sequence
    clock.set(START + PAST_FIVE_SIXTHS)

    assert cas.rotate() is True

    assert statuses(cas, X509) == [ACTIVE, OLD]
    assert statuses(cas, JWT) == [ACTIVE, OLD]
    assert cas.active(X509).record.authority_id == prepared.authority_id
    assert bundle_skis(cas) == {bytes.fromhex(first), bytes.fromhex(prepared.authority_id)}
    assert cas.bundle().sequence > sequence
    chains_to_bundle(before_switch, cas)
    after_switch = sign(cas)
    assert aki(after_switch).hex() == prepared.authority_id
    chains_to_bundle(after_switch, cas)


def test_the_old_key_leaves_the_bundle_once_it_expires(cas, clock):
    cas.rotate()
    first = cas.active(X509).record.authority_id
    first_jwt = cas.active(JWT).record.authority_id
    clock.set(START + PAST_HALF)
    cas.rotate()
    clock.set(START + PAST_FIVE_SIXTHS)
    cas.rotate()
    second = cas.active(X509).record.authority_id
    second_jwt = cas.active(JWT).record.authority_id
    clock.set(START + PAST_EXPIRY)

    assert cas.rotate() is True

    assert [a.authority_id for a in cas.list_authorities(X509)] == [second]
    assert [a.authority_id for a in cas.list_authorities(JWT)] == [second_jwt]
    assert bundle_skis(cas) == {bytes.fromhex(second)}
    assert first_jwt not in cas.bundle().jwt_authorities
    assert list(cas.bundle().jwt_authorities) == [second_jwt]
    assert first not in {a.authority_id for a in cas.list_authorities(X509)}


def test_svid_lifetime_is_capped_at_the_authority_not_after(cas, clock):
    cas.rotate()
    clock.advance(timedelta(hours=5, minutes=30))  # no rotate: the first key still signs

    leaf = sign(cas, ttl=timedelta(hours=1))
    assert leaf.not_valid_after_utc == START + CA_TTL

    token, expires_at, authority = cas.mint_jwt_svid(WEB, ["db"], ttl=timedelta(hours=1))
    assert token
    assert expires_at == authority.not_after == START + CA_TTL


# -- operator commands --------------------------------------------------------------------


def test_manual_prepare_then_activate(cas, clock, store):
    cas.rotate()
    first = cas.active(X509).record.authority_id
    sequence = cas.bundle().sequence

    prepared = cas.prepare(X509)

    assert prepared.status == PREPARED
    assert statuses(cas, X509) == [ACTIVE, PREPARED]
    assert cas.active(X509).record.authority_id == first
    assert bundle_skis(cas) == {bytes.fromhex(first), bytes.fromhex(prepared.authority_id)}
    assert cas.bundle().sequence > sequence
    assert statuses(cas, JWT) == [ACTIVE]  # only the kind asked for

    activated = cas.activate(X509)

    assert activated.authority_id == prepared.authority_id
    assert activated.status == ACTIVE
    assert statuses(cas, X509) == [ACTIVE, OLD]
    assert aki(sign(cas)).hex() == prepared.authority_id
    assert len(cas.bundle().x509_authorities) == 2
    actions = [(e.action, e.target) for e in store.list_audit()]
    assert ("localauthority.prepare", prepared.authority_id) in actions
    assert ("localauthority.activate", prepared.authority_id) in actions


def test_prepare_twice_replaces_the_prepared_key(cas):
    cas.rotate()
    first = cas.prepare(JWT)
    second = cas.prepare(JWT)

    assert statuses(cas, JWT) == [ACTIVE, PREPARED]
    prepared = [a.authority_id for a in cas.list_authorities(JWT) if a.status == PREPARED]
    assert prepared == [second.authority_id]
    assert first.authority_id not in cas.bundle().jwt_authorities


@pytest.mark.parametrize("kind", [X509, JWT])
def test_activate_without_a_prepared_key_is_refused(cas, kind):
    cas.rotate()

    with pytest.raises(FailedPrecondition) as refused:
        cas.activate(kind)

    assert refused.value.message == (
        f"there is no prepared {kind} authority to activate; "
        f"run 'tessera server localauthority {kind} prepare' first"
    )


# -- restarts and several servers -------------------------------------------------------


def test_restart_that_lost_its_keys_makes_a_new_key_and_keeps_trusting_the_old(
    store, clock, tmp_path
):
    before = authorities(store, memory_keys(tmp_path), clock)
    before.rotate()
    old = before.active(X509).record.authority_id
    old_jwt = before.active(JWT).record.authority_id
    leaf = sign(before)
    clock.advance(timedelta(minutes=5))

    after = authorities(store, memory_keys(tmp_path), clock)  # same store, keys gone
    assert after.rotate() is True

    new = after.active(X509).record.authority_id
    assert new != old
    assert after.active(JWT).record.authority_id != old_jwt
    assert statuses(after, X509) == [ACTIVE, OLD]
    assert bundle_skis(after) == {bytes.fromhex(old), bytes.fromhex(new)}
    assert old_jwt in after.bundle().jwt_authorities
    chains_to_bundle(leaf, after)
    assert aki(sign(after)).hex() == new

    clock.set(START + PAST_EXPIRY)  # the new key, 5 min younger, has just turned old itself
    after.rotate()

    assert bytes.fromhex(old) not in bundle_skis(after)
    assert bytes.fromhex(new) in bundle_skis(after)
    assert old not in {a.authority_id for a in after.list_authorities(X509)}
    assert old_jwt not in after.bundle().jwt_authorities


def test_restart_with_the_disk_key_manager_reuses_the_active_authority(store, clock, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    before = authorities(store, load_key_manager("disk", {}, data_dir), clock)
    before.rotate()
    x509_id = before.active(X509).record.authority_id
    jwt_id = before.active(JWT).record.authority_id
    clock.advance(timedelta(minutes=5))

    after = authorities(store, load_key_manager("disk", {}, data_dir), clock)

    assert after.rotate() is False
    assert after.active(X509).record.authority_id == x509_id
    assert after.active(JWT).record.authority_id == jwt_id
    assert statuses(after, X509) == [ACTIVE]
    assert statuses(after, JWT) == [ACTIVE]
    assert aki(sign(after)).hex() == x509_id


def test_the_bundle_is_the_union_of_every_server_sharing_the_store(store, clock, tmp_path):
    first = authorities(store, memory_keys(tmp_path), clock, server_id="server-a")
    second = authorities(store, memory_keys(tmp_path), clock, server_id="server-b")
    first.rotate()
    second.rotate()

    assert first.active(X509).record.authority_id != second.active(X509).record.authority_id
    assert statuses(first, X509) == [ACTIVE]  # each server rotates only its own keys
    assert statuses(second, X509) == [ACTIVE]
    assert first.refresh_bundle() is True
    assert first.refresh_bundle() is False
    expected = {
        bytes.fromhex(first.active(X509).record.authority_id),
        bytes.fromhex(second.active(X509).record.authority_id),
    }
    assert bundle_skis(first) == expected
    assert bundle_skis(second) == expected
    jwt_ids = {first.active(JWT).record.authority_id, second.active(JWT).record.authority_id}
    assert set(first.bundle().jwt_authorities) == jwt_ids
    assert set(second.bundle().jwt_authorities) == jwt_ids
    chains_to_bundle(sign(second), first)


# -- taint and revoke ---------------------------------------------------------------


def _switch(cas: Authorities, kind: str) -> str:
    """Prepare and activate a new authority; return the one it replaced."""
    cas.rotate()
    before = next(a.authority_id for a in cas.list_authorities(kind) if a.status == ACTIVE)
    cas.prepare(kind)
    cas.activate(kind)
    return before


@pytest.mark.parametrize("kind", [X509, JWT])
def test_the_active_authority_cannot_be_tainted(cas: Authorities, kind: str) -> None:
    cas.rotate()
    active = next(a.authority_id for a in cas.list_authorities(kind) if a.status == ACTIVE)
    with pytest.raises(FailedPrecondition) as caught:
        cas.taint(kind, active)
    assert caught.value.message == (
        f"{kind} authority {active} is active and still signing; activate another first "
        f"('tessera server localauthority {kind} prepare', then '... {kind} activate'), "
        "then taint it"
    )


@pytest.mark.parametrize("kind", [X509, JWT])
def test_revoking_needs_a_taint_first(cas: Authorities, kind: str) -> None:
    old = _switch(cas, kind)
    with pytest.raises(FailedPrecondition) as caught:
        cas.revoke(kind, old)
    assert caught.value.message.startswith(f"{kind} authority {old} is not tainted; taint it")


def test_taint_then_revoke_removes_the_authority_from_the_bundle(
    cas: Authorities, store: Datastore
) -> None:
    old = _switch(cas, X509)
    signed_by_old_ski = bytes.fromhex(old)
    sequence = cas.bundle().sequence
    tainted = cas.taint(X509, old)
    assert tainted.tainted
    assert cas.tainted_ids() == [old]
    assert signed_by_old_ski in bundle_skis(cas)  # tainted: still trusted while agents rotate
    assert cas.bundle().sequence > sequence
    cas.revoke(X509, old)
    assert signed_by_old_ski not in bundle_skis(cas)
    assert cas.tainted_ids() == []
    assert old not in {a.authority_id for a in cas.list_authorities(X509)}
    actions = [e.action for e in store.list_audit()]
    assert actions[:2] == ["localauthority.revoke", "localauthority.taint"]


@pytest.mark.parametrize("kind", [X509, JWT])
def test_automatic_rotation_goes_on_after_a_taint_and_a_revoke(
    cas: Authorities, clock: ManualClock, kind: str
) -> None:
    old = _switch(cas, kind)  # at START: the new key lives START-10s .. START+6h
    cas.taint(kind, old)
    cas.revoke(kind, old)
    [current] = cas.list_authorities(kind)

    clock.advance(PAST_HALF)
    assert cas.rotate() is True
    assert statuses(cas, kind) == [ACTIVE, PREPARED]
    clock.advance(PAST_FIVE_SIXTHS - PAST_HALF)
    assert cas.rotate() is True
    assert statuses(cas, kind) == [ACTIVE, OLD]
    [now_old] = [a for a in cas.list_authorities(kind) if a.status == OLD]
    assert now_old.authority_id == current.authority_id
    clock.advance(PAST_EXPIRY - PAST_FIVE_SIXTHS)
    cas.rotate()
    assert statuses(cas, kind) == [ACTIVE]
    if kind == X509:
        chains_to_bundle(sign(cas), cas)
    else:
        assert set(cas.jwt_keys()) == {cas.active(JWT).record.authority_id}


def test_a_revoked_jwt_key_leaves_the_bundle(cas: Authorities) -> None:
    old = _switch(cas, JWT)
    assert old in cas.jwt_keys()
    cas.taint(JWT, old)
    cas.revoke(JWT, old)
    assert old not in cas.jwt_keys()


def test_tainting_twice_or_an_unknown_authority_is_refused(cas: Authorities) -> None:
    old = _switch(cas, X509)
    cas.taint(X509, old)
    with pytest.raises(FailedPrecondition, match=f"x509 authority {old} is already tainted"):
        cas.taint(X509, old)
    with pytest.raises(NotFound) as caught:
        cas.taint(X509, "ffff")
    assert caught.value.message == (
        "no x509 authority ffff; list them with 'tessera server localauthority x509 show'")
    with pytest.raises(NotFound):
        cas.taint(JWT, old)  # an X.509 authority is not a JWT one


def test_a_failed_upstream_leaves_no_orphan_key(store: Datastore, clock: ManualClock,
                                               tmp_path: Path) -> None:
    class BrokenUpstream:
        name = "broken"

        def mint_x509_ca(self, **_: object) -> object:
            raise FailedPrecondition("the upstream CA has expired")

    keys = memory_keys(tmp_path)
    policy = AuthorityPolicy(trust_domain=TRUST_DOMAIN, server_id="s", ca_ttl=CA_TTL)
    cas = Authorities(policy, store, keys, upstream=BrokenUpstream(), clock=clock)  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition, match="the upstream CA has expired"):
        cas.rotate()
    assert store.list_authorities(kind=X509) == []
    assert keys._keys == {}  # type: ignore[attr-defined]  # no key left behind


# -- signing through the SVID template ----------------------------------------------------


def test_signed_chain_keeps_the_leaf_as_der_and_sends_no_intermediates_when_self_signed(cas):
    cas.rotate()
    key = generate_private_key(KeyType.EC_P256)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    signed = cas.sign_x509_svid_chain(
        WEB, key.public_key(), ttl=timedelta(hours=1), subject_public_key_info=spki
    )

    assert (signed.intermediates, signed.intermediates_der) == ((), ())
    assert signed.authority == cas.active(X509).record
    leaf = x509.load_der_x509_certificate(signed.leaf.der)
    assert leaf.serial_number == signed.leaf.serial_number
    assert leaf.not_valid_after_utc == signed.leaf.not_after == START + timedelta(hours=1)
    assert leaf.public_key() == key.public_key()
    chains_to_bundle(leaf, cas)


def test_with_an_upstream_every_svid_goes_out_with_the_authority_and_its_chain(
    store: Datastore, clock: ManualClock, tmp_path: Path
) -> None:
    root_key = generate_private_key(KeyType.EC_P256)
    middle_key = generate_private_key(KeyType.EC_P256)
    lifetime = {"not_before": START - timedelta(days=1), "not_after": START + timedelta(days=30)}
    root = build_ca_certificate(
        trust_domain=TRUST_DOMAIN, public_key=root_key.public_key(),
        signer=LocalSigner("root", root_key), issuer=None, **lifetime,
    )
    middle = build_ca_certificate(
        trust_domain=TRUST_DOMAIN, public_key=middle_key.public_key(),
        signer=LocalSigner("root", root_key), issuer=root, **lifetime,
    )

    class ChainedUpstream:
        name = "chained"

        def mint_x509_ca(self, *, trust_domain, public_key, not_before, not_after, signer=None):
            certificate = build_ca_certificate(
                trust_domain=trust_domain, public_key=public_key,
                signer=LocalSigner("middle", middle_key), issuer=middle,
                not_before=not_before, not_after=not_after,
            )
            return MintedCA(certificate, (middle,), (root,))

    policy = AuthorityPolicy(trust_domain=TRUST_DOMAIN, server_id="s", ca_ttl=CA_TTL)
    cas = Authorities(policy, store, memory_keys(tmp_path), upstream=ChainedUpstream(), clock=clock)  # type: ignore[arg-type]
    cas.rotate()
    authority = cas.active(X509).certificate
    assert authority is not None and authority.issuer == middle.subject
    key = generate_private_key(KeyType.EC_P256)

    signed = cas.sign_x509_svid_chain(WEB, key.public_key(), ttl=timedelta(hours=1))
    leaf, intermediates, record = cas.sign_x509_svid(WEB, key.public_key(), ttl=timedelta(hours=1))

    assert signed.intermediates == intermediates == (authority, middle)
    assert signed.intermediates_der == (
        authority.public_bytes(serialization.Encoding.DER),
        middle.public_bytes(serialization.Encoding.DER),
    )
    assert signed.authority == record == cas.active(X509).record
    x509.load_der_x509_certificate(signed.leaf.der).verify_directly_issued_by(authority)
    leaf.verify_directly_issued_by(authority)
    assert leaf.serial_number != signed.leaf.serial_number
