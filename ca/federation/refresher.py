"""Keeping federated bundles fresh: fetch each relationship's bundle endpoint when
the last bundle's refresh hint says so, check what came back, store it, and wake
the agents when the authorities changed.

    refresher = BundleRefresher(store, clock=clock, changed=watcher.poke)
    task = asyncio.create_task(refresher.run())                  # in the server
    outcome = await refresh_relationship(store, relationship, changed=watcher.poke)

A fetched bundle is refused (and the reason kept as the relationship's
``last_error``) when it does not parse, holds no authorities, names another
trust domain, or has a lower ``spiffe_sequence`` than the bundle stored. The
next fetch is due after the bundle's ``spiffe_refresh_hint``, clamped to
[5 s, 1 h]; after a failure, after 5 s, doubling up to 5 min. The schedule
follows the injected clock; only the wait between looks at it is a timer. With
several servers on one database each one refreshes: storing the same bundle
twice changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ca.datastore.interface import Datastore
from ca.datastore.records import FederationRelationship
from ca.federation.client import BundleFetcher, BundleFetchError, fetch_bundle
from ca.federation.relationship import check_bundle
from sdk.backoff import Backoff
from sdk.bundle import TrustBundle
from sdk.clock import Clock
from sdk.errors import InvalidArgument, NotFound, TesseraError
from sdk.keys import public_jwk
from sdk.spiffeid import parse_trust_domain

log = logging.getLogger(__name__)

MIN_REFRESH = timedelta(seconds=5)
MAX_REFRESH = timedelta(hours=1)
FIRST_RETRY = timedelta(seconds=5)
MAX_RETRY = timedelta(minutes=5)
POLL_SECONDS = 1.0

_RETRIES = Backoff(initial=FIRST_RETRY.total_seconds(), maximum=MAX_RETRY.total_seconds())


class BundleRefused(BundleFetchError):
    """The endpoint answered, but with a bundle that must not be stored."""


@dataclass(frozen=True)
class RefreshOutcome:
    """How one refresh went. ``bundle`` is what the endpoint served (None when the
    refresh failed); ``changed`` says the authorities changed and agents were told."""

    relationship: FederationRelationship
    bundle: TrustBundle | None = None
    changed: bool = False
    error: str | None = None


def next_refresh_delay(outcome: RefreshOutcome, failures: int) -> timedelta:
    """When to fetch again: at the bundle's refresh hint (clamped to [5 s, 1 h]), or
    after ``failures`` failures in a row, 5 s doubled each time up to 5 min."""
    if outcome.error is None and outcome.bundle is not None:
        hint = timedelta(seconds=outcome.bundle.refresh_hint)
        return min(max(hint, MIN_REFRESH), MAX_REFRESH)
    return timedelta(seconds=_RETRIES.delay(max(failures - 1, 0)))


def accept_bundle(
    relationship: FederationRelationship, data: bytes, stored: TrustBundle | None
) -> TrustBundle:
    """The bundle in ``data`` if it may replace ``stored``; BundleRefused otherwise."""
    url = relationship.bundle_endpoint_url
    trust_domain = parse_trust_domain(relationship.trust_domain)
    try:
        bundle = TrustBundle.from_spiffe_json(trust_domain, data)
        check_bundle(bundle, source=f"the bundle from {url}")
    except InvalidArgument as err:
        raise BundleRefused(f"{err.message}; it was not stored") from err
    if stored is not None and bundle.sequence < stored.sequence:
        raise BundleRefused(
            f"the bundle from {url} has spiffe_sequence {bundle.sequence}, lower than the "
            f"{stored.sequence} of the bundle stored, so it was not stored (an old server may "
            "be answering); if that trust domain was rebuilt, give its bundle with "
            f"'tessera server federation update --trust-domain {trust_domain.name} "
            "--trust-domain-bundle-path FILE'"
        )
    return bundle


def same_authorities(one: TrustBundle | None, other: TrustBundle) -> bool:
    """True when both hold the same X.509 and JWT authorities (sequence aside)."""
    if one is None:
        return False
    return set(one.x509_authorities) == set(other.x509_authorities) and _jwks(one) == _jwks(
        other
    )


def _jwks(bundle: TrustBundle) -> dict[str, dict[str, object]]:
    return {kid: public_jwk(key) for kid, key in bundle.jwt_authorities.items()}


async def refresh_relationship(
    store: Datastore,
    relationship: FederationRelationship,
    *,
    changed: Callable[[], None],
    fetch: BundleFetcher = fetch_bundle,
) -> RefreshOutcome:
    """Fetch, check and store the relationship's bundle now, and record how it went.

    A change of authorities bumps the bundle sequence, is audited and calls
    ``changed`` (which wakes waiting agents); a bundle that differs only in its
    sequence or refresh hint is stored quietly, so two trust domains federated
    with each other do not wake each other's agents forever. NotFound if the
    relationship is deleted meanwhile.
    """
    name = relationship.trust_domain
    stored = await asyncio.to_thread(_stored_bundle, store, name)
    try:
        data = await fetch(relationship, stored)
        bundle = accept_bundle(relationship, data, stored)
    except BundleFetchError as err:
        recorded = await asyncio.to_thread(
            store.record_federation_refresh, name, error=err.message
        )
        return RefreshOutcome(recorded, error=err.message)
    document = bundle.to_spiffe_json()
    new_authorities = not same_authorities(stored, bundle)
    unchanged = stored is not None and stored.to_spiffe_json() == document
    recorded = await asyncio.to_thread(
        store.record_federation_refresh,
        name,
        bundle=None if unchanged else document,
        bump_bundle_sequence=new_authorities,
    )
    if new_authorities:
        changed()
        await asyncio.to_thread(_audit, store, relationship, bundle)
        log.info(
            "stored a new bundle of %s from %s (sequence %d, %d X.509 and %d JWT authorities)",
            name, relationship.bundle_endpoint_url, bundle.sequence,
            len(bundle.x509_authorities), len(bundle.jwt_authorities),
        )
    return RefreshOutcome(recorded, bundle=bundle, changed=new_authorities)


def _stored_bundle(store: Datastore, trust_domain: str) -> TrustBundle | None:
    try:
        stored = store.get_federated_bundle(trust_domain)
    except NotFound:
        return None
    try:
        return TrustBundle.from_spiffe_json(parse_trust_domain(trust_domain), stored.bundle)
    except InvalidArgument:
        log.warning("the stored bundle of %s does not parse; treating it as absent", trust_domain)
        return None


def _audit(store: Datastore, relationship: FederationRelationship, bundle: TrustBundle) -> None:
    try:
        store.append_audit(
            actor="server",
            action="federation.bundle_update",
            target=bundle.trust_domain.as_spiffe_id(),
            details={
                "url": relationship.bundle_endpoint_url,
                "spiffe_sequence": bundle.sequence,
                "x509_authorities": len(bundle.x509_authorities),
                "jwt_authorities": len(bundle.jwt_authorities),
            },
        )
    except TesseraError:
        log.exception(
            "could not write the audit event for the new bundle of %s", relationship.trust_domain
        )


@dataclass
class _Slot:
    due_at: datetime
    failures: int
    updated_at: datetime  # of the relationship: a change of its settings refreshes at once


class BundleRefresher:
    """Refreshes every relationship's bundle on its own schedule, until cancelled."""

    def __init__(
        self,
        store: Datastore,
        *,
        clock: Clock,
        changed: Callable[[], None],
        fetch: BundleFetcher = fetch_bundle,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._changed = changed
        self._fetch = fetch
        self._poll_seconds = poll_seconds
        self._slots: dict[str, _Slot] = {}

    def due(self, relationships: Sequence[FederationRelationship]) -> list[FederationRelationship]:
        """The relationships to refresh now. New ones and ones whose settings changed
        are due at once; deleted ones are forgotten."""
        now = self._clock.now()
        names = {r.trust_domain for r in relationships}
        for gone in set(self._slots) - names:
            del self._slots[gone]
        for relationship in relationships:
            slot = self._slots.get(relationship.trust_domain)
            if slot is None or slot.updated_at != relationship.updated_at:
                self._slots[relationship.trust_domain] = _Slot(now, 0, relationship.updated_at)
        return [r for r in relationships if self._slots[r.trust_domain].due_at <= now]

    def next_refresh_at(self, trust_domain: str) -> datetime | None:
        slot = self._slots.get(trust_domain)
        return slot.due_at if slot is not None else None

    def failures(self, trust_domain: str) -> int:
        slot = self._slots.get(trust_domain)
        return slot.failures if slot is not None else 0

    def schedule(self, outcome: RefreshOutcome) -> None:
        """Set the next refresh of the outcome's trust domain."""
        slot = self._slots.get(outcome.relationship.trust_domain)
        if slot is None:
            return
        slot.failures = 0 if outcome.error is None else slot.failures + 1
        slot.due_at = self._clock.now() + next_refresh_delay(outcome, slot.failures)

    async def refresh_due(self) -> list[RefreshOutcome]:
        """Refresh every relationship that is due, side by side."""
        relationships = await asyncio.to_thread(self._store.list_federation_relationships)
        due = self.due(relationships)
        outcomes = await asyncio.gather(*(self._refresh(r) for r in due))
        return [o for o in outcomes if o is not None]

    async def _refresh(self, relationship: FederationRelationship) -> RefreshOutcome | None:
        name = relationship.trust_domain
        try:
            outcome = await refresh_relationship(
                self._store, relationship, changed=self._changed, fetch=self._fetch
            )
        except NotFound:
            self._slots.pop(name, None)  # deleted while it was being fetched
            return None
        except TesseraError as err:  # e.g. the database is down: retry later
            outcome = RefreshOutcome(relationship, error=err.message)
        except Exception:
            log.exception("refreshing the bundle of %s failed unexpectedly", name)
            outcome = RefreshOutcome(relationship, error="unexpected error; see the server log")
        self.schedule(outcome)
        if outcome.error is not None:
            log.warning(
                "refreshing the bundle of %s failed (%s); next try at %s",
                name, outcome.error, self.next_refresh_at(name),
            )
        return outcome

    async def run(self) -> None:
        """Refresh due bundles, then look again after ``poll_seconds``; until cancelled."""
        while True:
            try:
                await self.refresh_due()
            except TesseraError as err:
                log.warning("cannot refresh federated bundles: %s", err.message)
            except Exception:
                log.exception("refreshing federated bundles failed")
            await asyncio.sleep(self._poll_seconds)
