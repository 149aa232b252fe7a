"""The agent's cache: rotation timing with a manual clock, matching, bundles, JWT-SVIDs."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest
from spiffe import TrustDomain

from attestor.selector import Selector, parse_selectors
from sdk.clock import ManualClock
from sdk.errors import InvalidArgument
from tests.unit.workload_api.agent_helpers import AuthorityForTests, entry
from workload_api.cache import (
    AuthorizedEntry,
    JwtSvidCache,
    SvidCache,
    rotation_time,
)

START = datetime(2030, 1, 1, tzinfo=UTC)
TD = TrustDomain("example.org")
WEB = entry("e-web", "spiffe://example.org/web", "unix:uid:1000", created_at=10)
DB = entry("e-db", "spiffe://example.org/db", "unix:uid:1000", "unix:gid:50", created_at=20)
HOUR = timedelta(hours=1)


def workload(*selectors: str) -> frozenset[Selector]:
    return parse_selectors(selectors)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def cache(clock: ManualClock) -> SvidCache:
    return SvidCache(TD, clock=clock, rng=random.Random(7))


def store(cache: SvidCache, e: AuthorizedEntry, clock: ManualClock, life: timedelta = HOUR) -> None:
    cache.store_x509_svid(e, [f"cert-of-{e.id}".encode()], b"key", clock.now() + life)


# -- rotation -------------------------------------------------------------------------------


def test_rotation_time_is_half_life_jittered_by_ten_percent_of_it() -> None:
    expected_jitter = random.Random(3).uniform(-0.1, 0.1)
    planned = rotation_time(START, START + HOUR, random.Random(3))
    assert planned == START + HOUR * (0.5 * (1 + expected_jitter))

    times = [rotation_time(START, START + HOUR, random.Random(seed)) for seed in range(200)]
    assert min(times) >= START + HOUR * 0.45
    assert max(times) <= START + HOUR * 0.55
    assert len(set(times)) > 150, "agents started together must not renew together"


def test_rotation_is_counted_from_receipt_not_from_the_backdated_not_before() -> None:
    # A 4 s SVID (notBefore back-dated 10 s by the server) is renewed about 2 s after receipt.
    planned = rotation_time(START, START + timedelta(seconds=4), random.Random(1))
    assert START + timedelta(seconds=1.8) <= planned <= START + timedelta(seconds=2.2)


def test_an_svid_received_expired_is_not_renewed_in_a_tight_loop() -> None:
    assert rotation_time(START, START - HOUR, random.Random(1)) == START + timedelta(seconds=1)


def test_an_svid_becomes_due_at_its_rotation_time(cache: SvidCache, clock: ManualClock) -> None:
    cache.apply_entries([WEB], {WEB.id})
    assert cache.entries_needing_svids() == [WEB]
    store(cache, WEB, clock)
    assert cache.entries_needing_svids() == []
    svid = cache.svid_for(WEB.id)
    assert svid is not None
    assert cache.next_rotation() == svid.renew_at
    assert START + HOUR * 0.45 <= svid.renew_at <= START + HOUR * 0.55

    clock.set(svid.renew_at - timedelta(microseconds=1))
    assert cache.entries_needing_svids() == []
    clock.set(svid.renew_at)
    assert cache.entries_needing_svids() == [WEB]


def test_seeded_caches_plan_the_same_rotations(clock: ManualClock) -> None:
    planned = []
    for _ in range(2):
        cache = SvidCache(TD, clock=clock, rng=random.Random(42))
        cache.apply_entries([WEB, DB], {WEB.id, DB.id})
        store(cache, WEB, clock)
        store(cache, DB, clock)
        planned.append([cache.svid_for(e.id).renew_at for e in (WEB, DB)])  # type: ignore[union-attr]
    assert planned[0] == planned[1]
    assert planned[0][0] != planned[0][1]


def test_next_rotation_is_the_earliest(cache: SvidCache, clock: ManualClock) -> None:
    assert cache.next_rotation() is None
    cache.apply_entries([WEB, DB], {WEB.id, DB.id})
    store(cache, WEB, clock, life=HOUR)
    store(cache, DB, clock, life=timedelta(minutes=10))
    assert cache.next_rotation() == cache.svid_for(DB.id).renew_at  # type: ignore[union-attr]


def test_a_changed_entry_needs_a_new_svid(cache: SvidCache, clock: ManualClock) -> None:
    cache.apply_entries([WEB], {WEB.id})
    store(cache, WEB, clock)
    renamed = entry(WEB.id, "spiffe://example.org/web2", "unix:uid:1000", created_at=10)
    assert cache.apply_entries([renamed], {WEB.id})
    assert cache.entries_needing_svids() == [renamed]


def test_a_selector_change_keeps_the_svid(cache: SvidCache, clock: ManualClock) -> None:
    cache.apply_entries([WEB], {WEB.id})
    store(cache, WEB, clock)
    moved = entry(WEB.id, WEB.spiffe_id, "unix:uid:2000", created_at=10)
    assert cache.apply_entries([moved], {WEB.id})
    assert cache.entries_needing_svids() == []
    assert cache.x509_context(workload("unix:uid:1000")).svids == ()
    assert len(cache.x509_context(workload("unix:uid:2000")).svids) == 1


def test_an_entry_no_longer_authorized_loses_its_svid(cache: SvidCache, clock: ManualClock) -> None:
    cache.apply_entries([WEB, DB], {WEB.id, DB.id})
    store(cache, WEB, clock)
    store(cache, DB, clock)
    version = cache.version()
    assert cache.apply_entries([], {DB.id})
    assert cache.version() > version
    assert set(cache.entries) == {DB.id}
    assert cache.svid_for(WEB.id) is None
    assert cache.x509_svid_count == 1


def test_an_svid_for_an_entry_deleted_meanwhile_is_dropped(
    cache: SvidCache, clock: ManualClock
) -> None:
    cache.apply_entries([WEB], {WEB.id})
    cache.apply_entries([], set())
    store(cache, WEB, clock)
    assert cache.x509_svid_count == 0


def test_unchanged_entries_do_not_bump_the_version(cache: SvidCache) -> None:
    assert cache.apply_entries([WEB], {WEB.id})
    version = cache.version()
    assert not cache.apply_entries([WEB], {WEB.id})
    assert cache.version() == version


def test_expired_entries_are_neither_served_nor_signed(
    cache: SvidCache, clock: ManualClock
) -> None:
    expiring = entry("e-tmp", "spiffe://example.org/tmp", "unix:uid:1000",
                     expires_at=int((START + HOUR).timestamp()))
    cache.apply_entries([expiring], {expiring.id})
    store(cache, expiring, clock, life=2 * HOUR)
    assert len(cache.x509_context(workload("unix:uid:1000")).svids) == 1
    clock.advance(HOUR)
    assert cache.x509_context(workload("unix:uid:1000")).svids == ()
    assert cache.entries_needing_svids() == []


# -- matching -------------------------------------------------------------------------------


def test_an_entry_matches_when_all_its_selectors_are_the_workloads(cache: SvidCache) -> None:
    cache.apply_entries([WEB, DB], {WEB.id, DB.id})
    assert cache.matching_entries(workload("unix:uid:1000")) == [WEB]
    assert cache.matching_entries(workload("unix:uid:1000", "unix:gid:50", "unix:user:x")) == [
        WEB,
        DB,
    ]
    assert cache.matching_entries(workload("unix:gid:50")) == []
    assert cache.matching_entries(frozenset()) == []


def test_the_oldest_entry_gives_the_default_svid(cache: SvidCache, clock: ManualClock) -> None:
    cache.apply_entries([DB, WEB], {WEB.id, DB.id})
    store(cache, DB, clock)
    store(cache, WEB, clock)
    context = cache.x509_context(workload("unix:uid:1000", "unix:gid:50"))
    assert [s.spiffe_id for s in context.svids] == [WEB.spiffe_id, DB.spiffe_id]


def test_no_svid_yet_means_no_identity(cache: SvidCache) -> None:
    cache.apply_entries([WEB], {WEB.id})
    assert cache.x509_context(workload("unix:uid:1000")).svids == ()


def test_malformed_entries_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="the server sent a malformed entry"):
        AuthorizedEntry.from_json({"id": "x", "selectors": []})


# -- bundles --------------------------------------------------------------------------------


@pytest.fixture
def bundles() -> dict[str, AuthorityForTests]:
    names = ("example.org", "partner.test", "other.test")
    return {td: AuthorityForTests(td, START) for td in names}


def test_federated_bundles_go_to_workloads_whose_entries_federate(
    cache: SvidCache, clock: ManualClock, bundles: dict[str, AuthorityForTests]
) -> None:
    partner_web = entry("e-p", "spiffe://example.org/partner-client", "unix:uid:1",
                        federates_with=["partner.test", "unknown.test"], hint="partner")
    plain = entry("e-plain", "spiffe://example.org/plain", "unix:uid:2")
    cache.apply_entries([partner_web, plain], {partner_web.id, plain.id})
    cache.set_bundles(
        bundles["example.org"].bundle,
        {"partner.test": bundles["partner.test"].bundle,
         "spiffe://other.test": bundles["other.test"].bundle},
    )
    store(cache, partner_web, clock)
    store(cache, plain, clock)

    federating = cache.x509_context(workload("unix:uid:1"))
    assert dict(federating.federated_bundles) == {
        "spiffe://partner.test": bundles["partner.test"].bundle.x509_der()
    }
    assert federating.svids[0].hint == "partner"
    assert federating.svids[0].bundle_der == bundles["example.org"].bundle.x509_der()
    assert cache.x509_context(workload("unix:uid:2")).federated_bundles == {}

    # Bundle streams show a caller its own domain and the domains its entries federate with.
    assert set(cache.x509_bundles(workload("unix:uid:1"))) == {
        "spiffe://example.org", "spiffe://partner.test",
    }
    assert set(cache.x509_bundles(workload("unix:uid:2"))) == {"spiffe://example.org"}
    partner_jwks = bundles["partner.test"].bundle.jwks_json()
    assert cache.jwt_bundles(workload("unix:uid:1"))["spiffe://partner.test"] == partner_jwks
    assert set(cache.jwt_bundles(workload("unix:uid:2"))) == {"spiffe://example.org"}


def test_bundles_bump_the_version_only_when_they_change(
    cache: SvidCache, bundles: dict[str, AuthorityForTests]
) -> None:
    own = bundles["example.org"].bundle
    assert cache.set_bundles(own, {})
    version = cache.version()
    assert not cache.set_bundles(own, {})
    assert cache.version() == version
    assert cache.set_bundles(own, {"partner.test": bundles["partner.test"].bundle})
    assert cache.version() == version + 1


def test_a_federated_bundle_of_the_own_trust_domain_is_ignored(
    cache: SvidCache, bundles: dict[str, AuthorityForTests]
) -> None:
    cache.set_bundles(bundles["example.org"].bundle, {"example.org": bundles["other.test"].bundle})
    assert cache.federated_bundles == {}


def test_waiters_wake_on_a_change(cache: SvidCache) -> None:
    async def scenario() -> int:
        seen = cache.version()
        waiter = asyncio.ensure_future(cache.wait_for_change(seen))
        await asyncio.sleep(0)
        assert not waiter.done()
        cache.apply_entries([WEB], {WEB.id})
        return await asyncio.wait_for(waiter, 1)

    assert asyncio.run(scenario()) == 1


# -- JWT-SVIDs ------------------------------------------------------------------------------


def test_jwt_svids_are_cached_per_identity_and_audience_set(clock: ManualClock) -> None:
    jwts = JwtSvidCache(clock=clock)
    jwts.store("spiffe://example.org/web", ["db", "cache"], "token-1", START + timedelta(minutes=5))
    assert jwts.fresh("spiffe://example.org/web", ["cache", "db"]).token == "token-1"  # type: ignore[union-attr]
    assert jwts.fresh("spiffe://example.org/web", ["db"]) is None
    assert jwts.fresh("spiffe://example.org/api", ["db", "cache"]) is None
    jwts.store("spiffe://example.org/web", ["db"], "token-2", START + timedelta(minutes=5))
    assert jwts.fresh("spiffe://example.org/web", ["db"]).token == "token-2"  # type: ignore[union-attr]
    assert len(jwts) == 2


def test_a_jwt_svid_is_renewed_at_half_life_and_usable_until_expiry(clock: ManualClock) -> None:
    jwts = JwtSvidCache(clock=clock)
    jwts.store("spiffe://example.org/web", ["db"], "token", START + timedelta(minutes=5))
    clock.advance(timedelta(minutes=2, seconds=29))
    assert jwts.fresh("spiffe://example.org/web", ["db"]) is not None
    clock.advance(timedelta(seconds=1))
    assert jwts.fresh("spiffe://example.org/web", ["db"]) is None
    assert jwts.usable("spiffe://example.org/web", ["db"]) is not None
    clock.advance(timedelta(minutes=2, seconds=30))
    assert jwts.usable("spiffe://example.org/web", ["db"]) is None


def test_the_jwt_cache_forgets_expired_lost_and_least_used_tokens(clock: ManualClock) -> None:
    jwts = JwtSvidCache(clock=clock, max_entries=2)
    jwts.store("spiffe://example.org/a", ["x"], "a", START + timedelta(seconds=10))
    clock.advance(timedelta(seconds=20))
    jwts.store("spiffe://example.org/b", ["x"], "b", START + HOUR)
    assert len(jwts) == 1  # a had expired
    jwts.store("spiffe://example.org/c", ["x"], "c", START + HOUR)
    jwts.fresh("spiffe://example.org/b", ["x"])
    jwts.store("spiffe://example.org/d", ["x"], "d", START + HOUR)
    assert jwts.fresh("spiffe://example.org/c", ["x"]) is None  # least recently used
    jwts.forget_except({"spiffe://example.org/d"})
    assert len(jwts) == 1
