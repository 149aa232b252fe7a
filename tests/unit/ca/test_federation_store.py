"""The datastore's federation relationships, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from ca.datastore.records import FederationRelationship, NewFederationRelationship
from ca.datastore.store import Datastore
from sdk.clock import ManualClock
from sdk.errors import AlreadyExists, InvalidArgument, NotFound
from tests.unit.ca.conftest import START

SPIFFE = NewFederationRelationship(
    trust_domain="partner.org",
    bundle_endpoint_url="https://partner.example:8443",
    profile="https_spiffe",
    endpoint_spiffe_id="spiffe://partner.org/tessera/server",
)
WEB = NewFederationRelationship(
    trust_domain="web.org", bundle_endpoint_url="https://web.example", profile="https_web"
)
NOT_FOUND = (
    "no federation relationship with trust domain partner.org; "
    "'tessera server federation list' shows the ones there are"
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def store(datastore_url: str, clock: ManualClock) -> Iterator[Datastore]:
    with Datastore.open(datastore_url, clock=clock) as opened:
        yield opened


def test_create_get_and_list(store: Datastore, clock: ManualClock):
    created = store.create_federation_relationship(SPIFFE)
    clock.advance(timedelta(seconds=1))
    store.create_federation_relationship(WEB)

    assert created == FederationRelationship(
        trust_domain="partner.org",
        bundle_endpoint_url="https://partner.example:8443",
        profile="https_spiffe",
        endpoint_spiffe_id="spiffe://partner.org/tessera/server",
        created_at=START,
        updated_at=START,
        last_refresh_at=None,
        last_error=None,
    )
    assert store.get_federation_relationship("partner.org") == created
    assert [r.trust_domain for r in store.list_federation_relationships()] == [
        "partner.org",
        "web.org",
    ]
    assert store.get_federation_relationship("web.org").endpoint_spiffe_id is None


def test_a_second_relationship_with_a_trust_domain_is_refused(store: Datastore):
    store.create_federation_relationship(SPIFFE)

    with pytest.raises(AlreadyExists) as refused:
        store.create_federation_relationship(SPIFFE)

    assert refused.value.message == (
        "a federation relationship with partner.org exists already; change it with "
        "'tessera server federation update' or delete it first"
    )


def test_an_unknown_profile_is_refused(store: Datastore):
    with pytest.raises(InvalidArgument) as refused:
        store.create_federation_relationship(
            NewFederationRelationship("partner.org", "https://p.example", "http")
        )

    assert refused.value.message == (
        "bundle endpoint profile 'http' is not one of https_web, https_spiffe"
    )
    assert store.list_federation_relationships() == []


def test_creating_with_a_bundle_stores_it_and_wakes_agents(store: Datastore):
    before = store.bundle_sequence()

    store.create_federation_relationship(SPIFFE, bundle=b'{"keys": []}')

    assert store.get_federated_bundle("partner.org").bundle == b'{"keys": []}'
    assert store.bundle_sequence() == before + 1


def test_unknown_relationships_are_not_found(store: Datastore):
    for call in (
        lambda: store.get_federation_relationship("partner.org"),
        lambda: store.update_federation_relationship(SPIFFE),
        lambda: store.delete_federation_relationship("partner.org"),
        lambda: store.record_federation_refresh("partner.org", error="x"),
    ):
        with pytest.raises(NotFound) as refused:
            call()
        assert refused.value.message == NOT_FOUND


def test_update_replaces_the_settings_and_forgets_the_last_refresh(
    store: Datastore, clock: ManualClock
):
    store.create_federation_relationship(SPIFFE)
    store.record_federation_refresh("partner.org", error="cannot reach it")
    clock.advance(timedelta(minutes=1))

    updated = store.update_federation_relationship(
        NewFederationRelationship("partner.org", "https://new.example", "https_web"),
        bundle=b"{}",
    )

    assert updated == FederationRelationship(
        trust_domain="partner.org",
        bundle_endpoint_url="https://new.example",
        profile="https_web",
        endpoint_spiffe_id=None,
        created_at=START,
        updated_at=START + timedelta(minutes=1),
    )
    assert store.get_federation_relationship("partner.org") == updated
    assert store.get_federated_bundle("partner.org").bundle == b"{}"


def test_delete_takes_the_federated_bundle_with_it(store: Datastore):
    store.create_federation_relationship(SPIFFE, bundle=b"{}")
    store.set_federated_bundle("other.org", b"{}")
    before = store.bundle_sequence()

    deleted = store.delete_federation_relationship("partner.org")

    assert deleted.trust_domain == "partner.org"
    assert store.list_federation_relationships() == []
    assert [b.trust_domain for b in store.list_federated_bundles()] == ["other.org"]
    assert store.bundle_sequence() == before + 1


def test_deleting_a_relationship_without_a_bundle_changes_no_bundle(store: Datastore):
    store.create_federation_relationship(WEB)
    before = store.bundle_sequence()

    store.delete_federation_relationship("web.org")

    assert store.bundle_sequence() == before


def test_a_refresh_records_its_time_error_and_bundle(store: Datastore, clock: ManualClock):
    store.create_federation_relationship(SPIFFE)
    before = store.bundle_sequence()
    clock.advance(timedelta(seconds=30))

    failed = store.record_federation_refresh("partner.org", error="cannot reach it")
    assert (failed.last_refresh_at, failed.last_error) == (START + timedelta(seconds=30),
                                                           "cannot reach it")

    clock.advance(timedelta(seconds=30))
    worked = store.record_federation_refresh("partner.org", bundle=b"{}")
    assert (worked.last_refresh_at, worked.last_error) == (START + timedelta(minutes=1), None)
    assert store.get_federated_bundle("partner.org").bundle == b"{}"
    assert store.bundle_sequence() == before

    store.record_federation_refresh("partner.org", bundle=b"{ }", bump_bundle_sequence=True)
    assert store.bundle_sequence() == before + 1
    assert store.get_federation_relationship("partner.org").updated_at == START


def test_a_late_refresh_cannot_bring_back_a_deleted_trust_domain(store: Datastore):
    store.create_federation_relationship(SPIFFE, bundle=b"{}")
    store.delete_federation_relationship("partner.org")

    with pytest.raises(NotFound):
        store.record_federation_refresh("partner.org", bundle=b"{}", bump_bundle_sequence=True)

    assert store.list_federated_bundles() == []
