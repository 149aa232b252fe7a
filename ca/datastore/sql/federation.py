"""Federated bundles and federation relationships."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from ca.datastore.records import (
    BUNDLE_ENDPOINT_PROFILES,
    FederatedBundle,
    FederationRelationship,
    NewFederationRelationship,
)
from ca.datastore.schema import BUNDLE_SEQUENCE, FederatedBundleRow, FederationRelationshipRow
from ca.datastore.sql.base import (
    SqlBase,
    _bump,
    _check_choice,
    _insert_on_conflict,
    _stored_time,
    _table,
)
from sdk.errors import NotFound


class FederatedBundlesMixin(SqlBase):
    """:class:`~ca.datastore.interface.FederatedBundleStore` on SQL."""

    def set_federated_bundle(self, trust_domain: str, bundle: bytes) -> FederatedBundle:
        """Store (or replace) the SPIFFE bundle JSON of a federated trust domain."""
        now = self._clock.now()
        values = {"trust_domain": trust_domain, "bundle": bundle, "updated_at": now}
        changed = {"bundle": bundle, "updated_at": now}
        with self._writing() as session:
            session.connection().execute(
                _insert_on_conflict(
                    self.dialect,
                    FederatedBundleRow,
                    values,
                    keys=("trust_domain",),
                    changes=changed,
                )
            )
        return FederatedBundle(trust_domain, bundle, _stored_time(now))

    def get_federated_bundle(self, trust_domain: str) -> FederatedBundle:
        with self._reading() as session:
            row = session.get(FederatedBundleRow, trust_domain)
            if row is None:
                raise _bundle_not_found(trust_domain)
            return FederatedBundle(row.trust_domain, row.bundle, row.updated_at)

    def list_federated_bundles(self) -> list[FederatedBundle]:
        query = select(FederatedBundleRow).order_by(FederatedBundleRow.trust_domain)
        with self._reading() as session:
            return [
                FederatedBundle(row.trust_domain, row.bundle, row.updated_at)
                for row in session.scalars(query)
            ]

    def delete_federated_bundle(self, trust_domain: str) -> None:
        with self._writing() as session:
            removed = session.connection().execute(
                delete(_table(FederatedBundleRow)).where(
                    FederatedBundleRow.trust_domain == trust_domain
                )
            )
            if removed.rowcount == 0:
                raise _bundle_not_found(trust_domain)


class FederationRelationshipsMixin(SqlBase):
    """:class:`~ca.datastore.interface.FederationRelationshipStore` on SQL."""

    def create_federation_relationship(
        self, relationship: NewFederationRelationship, *, bundle: bytes | None = None
    ) -> FederationRelationship:
        """Store a new relationship; with ``bundle`` (SPIFFE JSON) also store the
        federated trust domain's bundle, in the same transaction, and bump the bundle
        sequence. AlreadyExists if that trust domain has a relationship already."""
        _check_choice("bundle endpoint profile", relationship.profile, BUNDLE_ENDPOINT_PROFILES)
        now = self._clock.now()
        conflict = (
            f"a federation relationship with {relationship.trust_domain} exists already; "
            "change it with 'tessera server federation update' or delete it first"
        )
        with self._writing(conflict=conflict) as session:
            session.execute(
                insert(FederationRelationshipRow).values(
                    created_at=now,
                    updated_at=now,
                    last_refresh_at=None,
                    last_error=None,
                    **_relationship_columns(relationship),
                )
            )
            if bundle is not None:
                self._put_federated_bundle(session, relationship.trust_domain, bundle, now)
                _bump(session, BUNDLE_SEQUENCE)
            return _relationship_record(_relationship_row(session, relationship.trust_domain))

    def get_federation_relationship(self, trust_domain: str) -> FederationRelationship:
        with self._reading() as session:
            return _relationship_record(_relationship_row(session, trust_domain))

    def list_federation_relationships(self) -> list[FederationRelationship]:
        """Every relationship, by trust domain."""
        query = select(FederationRelationshipRow).order_by(FederationRelationshipRow.trust_domain)
        with self._reading() as session:
            return [_relationship_record(row) for row in session.scalars(query)]

    def update_federation_relationship(
        self, relationship: NewFederationRelationship, *, bundle: bytes | None = None
    ) -> FederationRelationship:
        """Replace the endpoint settings of the trust domain's relationship (its last
        refresh and error are cleared: they were about the old settings); ``bundle``
        as for :meth:`create_federation_relationship`. NotFound without one."""
        _check_choice("bundle endpoint profile", relationship.profile, BUNDLE_ENDPOINT_PROFILES)
        now = self._clock.now()
        with self._writing() as session:
            row = _relationship_row(session, relationship.trust_domain, lock=True)
            for name, value in _relationship_columns(relationship).items():
                setattr(row, name, value)
            row.updated_at = now
            row.last_refresh_at = None
            row.last_error = None
            if bundle is not None:
                self._put_federated_bundle(session, relationship.trust_domain, bundle, now)
                _bump(session, BUNDLE_SEQUENCE)
            session.flush()
            return _relationship_record(row)

    def delete_federation_relationship(self, trust_domain: str) -> FederationRelationship:
        """Delete the relationship and the trust domain's federated bundle with it
        (workloads stop trusting that trust domain); bumps the bundle sequence when a
        bundle went. Returns the deleted relationship; NotFound if there is none."""
        with self._writing() as session:
            record = _relationship_record(_relationship_row(session, trust_domain, lock=True))
            connection = session.connection()
            connection.execute(
                delete(_table(FederationRelationshipRow)).where(
                    FederationRelationshipRow.trust_domain == trust_domain
                )
            )
            removed = connection.execute(
                delete(_table(FederatedBundleRow)).where(
                    FederatedBundleRow.trust_domain == trust_domain
                )
            )
            if removed.rowcount:
                _bump(session, BUNDLE_SEQUENCE)
            return record

    def record_federation_refresh(
        self,
        trust_domain: str,
        *,
        error: str | None = None,
        bundle: bytes | None = None,
        bump_bundle_sequence: bool = False,
    ) -> FederationRelationship:
        """Note how fetching the trust domain's bundle endpoint went: now, and the
        error (None when it worked). With ``bundle`` the fetched bundle is stored in
        the same transaction; ``bump_bundle_sequence`` bumps the bundle sequence too,
        for a change agents must hear of. NotFound (and nothing stored) if the
        relationship was deleted meanwhile, so a late fetch cannot bring back the
        bundle of a trust domain no longer federated with."""
        now = self._clock.now()
        with self._writing() as session:
            row = _relationship_row(session, trust_domain, lock=True)
            row.last_refresh_at = now
            row.last_error = error
            if bundle is not None:
                self._put_federated_bundle(session, trust_domain, bundle, now)
            if bump_bundle_sequence:
                _bump(session, BUNDLE_SEQUENCE)
            session.flush()
            return _relationship_record(row)

    def _put_federated_bundle(
        self, session: Session, trust_domain: str, bundle: bytes, now: datetime
    ) -> None:
        session.connection().execute(
            _insert_on_conflict(
                self.dialect,
                FederatedBundleRow,
                {"trust_domain": trust_domain, "bundle": bundle, "updated_at": now},
                keys=("trust_domain",),
                changes={"bundle": bundle, "updated_at": now},
            )
        )


def _bundle_not_found(trust_domain: str) -> NotFound:
    return NotFound(f"no bundle is stored for trust domain {trust_domain}")


def _relationship_columns(relationship: NewFederationRelationship) -> dict[str, Any]:
    return {
        "trust_domain": relationship.trust_domain,
        "bundle_endpoint_url": relationship.bundle_endpoint_url,
        "profile": relationship.profile,
        "endpoint_spiffe_id": relationship.endpoint_spiffe_id,
    }


def _relationship_row(
    session: Session, trust_domain: str, *, lock: bool = False
) -> FederationRelationshipRow:
    row = session.get(
        FederationRelationshipRow, trust_domain, populate_existing=True, with_for_update=lock
    )
    if row is None:
        raise NotFound(
            f"no federation relationship with trust domain {trust_domain}; "
            "'tessera server federation list' shows the ones there are"
        )
    return row


def _relationship_record(row: FederationRelationshipRow) -> FederationRelationship:
    return FederationRelationship(
        trust_domain=row.trust_domain,
        bundle_endpoint_url=row.bundle_endpoint_url,
        profile=row.profile,
        endpoint_spiffe_id=row.endpoint_spiffe_id,
        created_at=_stored_time(row.created_at),
        updated_at=_stored_time(row.updated_at),
        last_refresh_at=_stored_time(row.last_refresh_at) if row.last_refresh_at else None,
        last_error=row.last_error,
    )
