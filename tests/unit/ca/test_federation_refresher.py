"""The refresher's decisions: what it stores, what it refuses, when it fetches next.

The bundle endpoint is a fake fetcher; time is a ManualClock, so nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import pytest

from ca.datastore.records import NewFederationRelationship
from ca.datastore.store import Datastore
from ca.federation.client import BundleFetchError
from ca.federation.refresher import (
    BundleRefresher,
    RefreshOutcome,
    next_refresh_delay,
    refresh_relationship,
)
from sdk.bundle import TrustBundle
from sdk.clock import ManualClock
from sdk.spiffeid import parse_trust_domain
from tests.unit.ca.conftest import START
from tests.unit.ca.federation_helpers import FakeEndpoint, bundle, relationship

URL = "https://partner.example:8443"
PARTNER = NewFederationRelationship(
    trust_domain="partner.org",
    bundle_endpoint_url=URL,
    profile="https_spiffe",
    endpoint_spiffe_id="spiffe://partner.org/tessera/server",
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def store(sqlite_url: str, clock: ManualClock) -> Iterator[Datastore]:
    with Datastore.open(sqlite_url, clock=clock) as opened:
        yield opened


@pytest.fixture
def endpoint() -> FakeEndpoint:
    return FakeEndpoint()


class Woken:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def woken() -> Woken:
    return Woken()


@pytest.fixture
def refresher(
    store: Datastore, clock: ManualClock, endpoint: FakeEndpoint, woken: Woken
) -> BundleRefresher:
    return BundleRefresher(store, clock=clock, changed=woken, fetch=endpoint)


def stored(store: Datastore) -> TrustBundle:
    document = store.get_federated_bundle("partner.org").bundle
    return TrustBundle.from_spiffe_json(parse_trust_domain("partner.org"), document)


def refresh(store: Datastore, endpoint: FakeEndpoint, woken: Woken) -> RefreshOutcome:
    current = store.get_federation_relationship("partner.org")
    return asyncio.run(refresh_relationship(store, current, changed=woken, fetch=endpoint))


# -- when to fetch next -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hint", "delay"),
    [(0, 5), (1, 5), (5, 5), (8, 8), (300, 300), (3600, 3600), (86400, 3600)],
)
def test_the_refresh_hint_is_clamped_to_5_seconds_and_1_hour(hint: int, delay: int):
    outcome = RefreshOutcome(relationship(), bundle=bundle("partner.org", 0, refresh_hint=hint))

    assert next_refresh_delay(outcome, 0) == timedelta(seconds=delay)


def test_failures_back_off_doubling_up_to_5_minutes():
    failed = RefreshOutcome(relationship(), error="cannot reach it")

    delays = [next_refresh_delay(failed, n).total_seconds() for n in range(1, 10)]

    assert delays == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert next_refresh_delay(failed, 0) == timedelta(seconds=5)
    assert next_refresh_delay(failed, 100_000) == timedelta(minutes=5)  # a partner gone for good


def test_a_new_relationship_is_fetched_at_once_then_at_its_hint(
    store: Datastore, clock: ManualClock, endpoint: FakeEndpoint, refresher: BundleRefresher
):
    store.create_federation_relationship(PARTNER, bundle=bundle("partner.org", 0).to_spiffe_json())
    endpoint.answer = bundle("partner.org", 0, 1, sequence=2, refresh_hint=60).to_spiffe_json()

    asyncio.run(refresher.refresh_due())
    assert len(endpoint.calls) == 1
    assert refresher.next_refresh_at("partner.org") == START + timedelta(seconds=60)

    clock.advance(timedelta(seconds=59))
    asyncio.run(refresher.refresh_due())
    assert len(endpoint.calls) == 1

    clock.advance(timedelta(seconds=1))
    asyncio.run(refresher.refresh_due())
    assert len(endpoint.calls) == 2


def test_failures_are_retried_with_backoff_and_recorded(
    store: Datastore, clock: ManualClock, endpoint: FakeEndpoint, refresher: BundleRefresher
):
    store.create_federation_relationship(PARTNER, bundle=bundle("partner.org", 0).to_spiffe_json())
    endpoint.answer = BundleFetchError(f"cannot reach the bundle endpoint {URL}")

    asyncio.run(refresher.refresh_due())
    assert refresher.next_refresh_at("partner.org") == START + timedelta(seconds=5)
    clock.advance(timedelta(seconds=5))
    asyncio.run(refresher.refresh_due())
    assert refresher.failures("partner.org") == 2
    assert refresher.next_refresh_at("partner.org") == START + timedelta(seconds=15)

    recorded = store.get_federation_relationship("partner.org")
    assert recorded.last_error == f"cannot reach the bundle endpoint {URL}"
    assert recorded.last_refresh_at == START + timedelta(seconds=5)

    clock.advance(timedelta(seconds=10))
    endpoint.answer = bundle("partner.org", 0, refresh_hint=30).to_spiffe_json()
    asyncio.run(refresher.refresh_due())
    assert refresher.failures("partner.org") == 0
    assert refresher.next_refresh_at("partner.org") == START + timedelta(seconds=45)
    assert store.get_federation_relationship("partner.org").last_error is None


def test_changed_settings_are_fetched_at_once_and_deleted_ones_forgotten(
    store: Datastore, clock: ManualClock, endpoint: FakeEndpoint, refresher: BundleRefresher
):
    store.create_federation_relationship(PARTNER, bundle=bundle("partner.org", 0).to_spiffe_json())
    endpoint.answer = bundle("partner.org", 0, refresh_hint=600).to_spiffe_json()
    asyncio.run(refresher.refresh_due())

    clock.advance(timedelta(seconds=1))
    store.update_federation_relationship(
        NewFederationRelationship("partner.org", "https://new.example", "https_web")
    )
    asyncio.run(refresher.refresh_due())
    assert len(endpoint.calls) == 2

    store.delete_federation_relationship("partner.org")
    asyncio.run(refresher.refresh_due())
    assert refresher.next_refresh_at("partner.org") is None


# -- what is stored ------------------------------------------------------------------------


def test_new_authorities_are_stored_audited_and_wake_agents(
    store: Datastore, endpoint: FakeEndpoint, woken: Woken
):
    first = bundle("partner.org", 0, sequence=3)
    store.create_federation_relationship(PARTNER, bundle=first.to_spiffe_json())
    sequence = store.bundle_sequence()
    served = bundle("partner.org", 0, 1, sequence=4, jwt_slots=(0,))
    endpoint.answer = served.to_spiffe_json()

    outcome = refresh(store, endpoint, woken)

    assert endpoint.calls == [("partner.org", first)]  # verified against the stored bundle
    assert (outcome.changed, outcome.error, outcome.bundle) == (True, None, served)
    assert stored(store) == served
    assert store.bundle_sequence() == sequence + 1
    assert woken.count == 1
    event = store.list_audit(limit=1)[0]
    assert (event.actor, event.action, event.target) == (
        "server", "federation.bundle_update", "spiffe://partner.org"
    )
    assert event.details == {
        "url": URL, "spiffe_sequence": 4, "x509_authorities": 2, "jwt_authorities": 1
    }


def test_a_new_sequence_alone_is_stored_quietly(
    store: Datastore, endpoint: FakeEndpoint, woken: Woken
):
    store.create_federation_relationship(
        PARTNER, bundle=bundle("partner.org", 0, sequence=3).to_spiffe_json()
    )
    sequence = store.bundle_sequence()
    endpoint.answer = bundle("partner.org", 0, sequence=9).to_spiffe_json()

    outcome = refresh(store, endpoint, woken)

    assert (outcome.changed, outcome.error) == (False, None)
    assert stored(store).sequence == 9
    assert store.bundle_sequence() == sequence  # mutual federation must not ping-pong
    assert woken.count == 0


def test_a_lower_sequence_is_refused(store: Datastore, endpoint: FakeEndpoint, woken: Woken):
    kept = bundle("partner.org", 0, sequence=5)
    store.create_federation_relationship(PARTNER, bundle=kept.to_spiffe_json())
    endpoint.answer = bundle("partner.org", 1, sequence=4).to_spiffe_json()

    outcome = refresh(store, endpoint, woken)

    assert outcome.error == (
        f"the bundle from {URL} has spiffe_sequence 4, lower than the 5 of the bundle stored, "
        "so it was not stored (an old server may be answering); if that trust domain was "
        "rebuilt, give its bundle with 'tessera server federation update --trust-domain "
        "partner.org --trust-domain-bundle-path FILE'"
    )
    assert stored(store) == kept
    assert store.get_federation_relationship("partner.org").last_error == outcome.error
    assert woken.count == 0


@pytest.mark.parametrize(
    ("served", "message"),
    [
        (b"<html>", "bundle is not JSON; expected a SPIFFE bundle (JWKS); it was not stored"),
        (b'{"keys": [], "spiffe_sequence": 9}',
         f"the bundle from {URL} for partner.org holds no authorities; it was not stored"),
    ],
)
def test_a_bundle_that_is_not_one_is_refused(
    store: Datastore, endpoint: FakeEndpoint, woken: Woken, served: bytes, message: str
):
    kept = bundle("partner.org", 0)
    store.create_federation_relationship(PARTNER, bundle=kept.to_spiffe_json())
    endpoint.answer = served

    assert refresh(store, endpoint, woken).error == message
    assert stored(store) == kept


def test_a_bundle_of_another_trust_domain_is_refused(
    store: Datastore, endpoint: FakeEndpoint, woken: Woken
):
    store.create_federation_relationship(PARTNER, bundle=bundle("partner.org", 0).to_spiffe_json())
    other = bundle("other.org", 0, sequence=9)
    endpoint.answer = other.to_spiffe_json()

    error = refresh(store, endpoint, woken).error

    subject = other.x509_authorities[0].subject.rfc4514_string()
    assert error == (
        f"the bundle from {URL} is for trust domain other.org, not partner.org: its authority "
        f"{subject!r} carries spiffe://other.org; it was not stored"
    )


def test_a_relationship_deleted_during_the_fetch_gets_no_bundle(
    store: Datastore, endpoint: FakeEndpoint, refresher: BundleRefresher
):
    store.create_federation_relationship(PARTNER, bundle=bundle("partner.org", 0).to_spiffe_json())
    endpoint.answer = bundle("partner.org", 0, 1, sequence=2).to_spiffe_json()
    endpoint.during_fetch.append(lambda: store.delete_federation_relationship("partner.org"))

    outcomes = asyncio.run(refresher.refresh_due())

    assert outcomes == []
    assert store.list_federated_bundles() == []
    assert refresher.next_refresh_at("partner.org") is None


def test_an_https_web_relationship_needs_no_stored_bundle(
    store: Datastore, endpoint: FakeEndpoint, woken: Woken
):
    store.create_federation_relationship(
        NewFederationRelationship("partner.org", URL, "https_web")
    )
    served = bundle("partner.org", 0)
    endpoint.answer = served.to_spiffe_json()

    outcome = refresh(store, endpoint, woken)

    assert endpoint.calls == [("partner.org", None)]
    assert (outcome.changed, stored(store)) == (True, served)
