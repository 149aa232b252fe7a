"""The admin API's federation endpoints (under ``/v1/federation``), behind the
``tessera server federation ...`` commands.

    app.include_router(federation_router(store=store, trust_domain=td, changed=poke, audit=audit))

    POST   /v1/federation/relationships               create (201)
    GET    /v1/federation/relationships               list
    GET    /v1/federation/relationships/{td}          show
    PUT    /v1/federation/relationships/{td}          update (every setting, as create)
    DELETE /v1/federation/relationships/{td}          delete, with the federated bundle
    POST   /v1/federation/relationships/{td}/refresh  fetch the bundle now

A relationship's JSON carries its settings, when it was last refreshed and the
last error, and a summary of the trust domain's stored bundle.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from ca.api.errors import RequestBody, error_responses
from ca.datastore.interface import Datastore
from ca.datastore.records import HTTPS_SPIFFE, FederationRelationship, NewFederationRelationship
from ca.federation.client import BundleFetcher, BundleFetchError, fetch_bundle
from ca.federation.refresher import refresh_relationship
from ca.federation.relationship import parse_given_bundle, validate_relationship
from sdk.bundle import TrustBundle
from sdk.errors import InvalidArgument, NotFound
from sdk.spiffeid import TrustDomain, parse_trust_domain

Audit = Callable[[str, str, dict[str, Any] | None], None]


class RelationshipBody(RequestBody):
    trust_domain: str = Field(max_length=300)
    bundle_endpoint_url: str = Field(max_length=4096)
    bundle_endpoint_profile: str = Field(max_length=32)
    endpoint_spiffe_id: str | None = Field(default=None, max_length=4096)
    # The trust domain's bundle, PEM or SPIFFE JSON: needed the first time for https_spiffe.
    trust_domain_bundle: str | None = Field(default=None, max_length=512 * 1024)


class RefreshFailed(BundleFetchError):
    """``federation refresh`` could not store a fresh bundle; the message says why."""


def relationship_json(
    relationship: FederationRelationship, stored: TrustBundle | None
) -> dict[str, Any]:
    return {
        "trust_domain": relationship.trust_domain,
        "bundle_endpoint_url": relationship.bundle_endpoint_url,
        "bundle_endpoint_profile": relationship.profile,
        "endpoint_spiffe_id": relationship.endpoint_spiffe_id,
        "created_at": _unix(relationship.created_at),
        "updated_at": _unix(relationship.updated_at),
        "last_refresh_at": _unix(relationship.last_refresh_at),
        "last_error": relationship.last_error,
        "bundle": bundle_summary(stored),
    }


def bundle_summary(bundle: TrustBundle | None) -> dict[str, Any] | None:
    if bundle is None:
        return None
    return {
        "spiffe_sequence": bundle.sequence,
        "refresh_hint": bundle.refresh_hint,
        "x509_authorities": len(bundle.x509_authorities),
        "jwt_authorities": len(bundle.jwt_authorities),
    }


def _unix(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def federation_router(
    *,
    store: Datastore,
    trust_domain: TrustDomain,
    changed: Callable[[], None],
    audit: Audit,
    fetch: BundleFetcher = fetch_bundle,
) -> APIRouter:
    """The federation endpoints. ``changed`` wakes waiting agents; ``audit`` writes
    an admin audit event (action, target, details)."""
    router = APIRouter(prefix="/v1/federation")

    def stored_bundle(name: str) -> TrustBundle | None:
        try:
            stored = store.get_federated_bundle(name)
        except NotFound:
            return None
        return TrustBundle.from_spiffe_json(parse_trust_domain(name), stored.bundle)

    def described(relationship: FederationRelationship) -> dict[str, Any]:
        return relationship_json(relationship, stored_bundle(relationship.trust_domain))

    def validated(body: RelationshipBody) -> tuple[NewFederationRelationship, bytes | None]:
        """The relationship and the bundle (SPIFFE JSON) to store with it, if any."""
        relationship = validate_relationship(
            trust_domain,
            trust_domain=body.trust_domain,
            bundle_endpoint_url=body.bundle_endpoint_url,
            profile=body.bundle_endpoint_profile,
            endpoint_spiffe_id=body.endpoint_spiffe_id,
        )
        federated = parse_trust_domain(relationship.trust_domain)
        if body.trust_domain_bundle is not None:
            given = parse_given_bundle(federated, body.trust_domain_bundle.encode())
            if relationship.profile == HTTPS_SPIFFE and not given.x509_authorities:
                raise InvalidArgument(
                    "the given bundle holds no X.509 authorities; profile https_spiffe needs "
                    f"them to authenticate the endpoint of {federated.name}"
                )
            return relationship, given.to_spiffe_json()
        if relationship.profile == HTTPS_SPIFFE:
            current = stored_bundle(federated.name)
            if current is None or not current.x509_authorities:
                raise InvalidArgument(
                    f"profile https_spiffe needs the current bundle of {federated.name} to "
                    "authenticate its endpoint the first time; give it with "
                    "--trust-domain-bundle-path FILE (e.g. the output of 'tessera server "
                    f"bundle show --format spiffe' on a server of {federated.name})"
                )
        return relationship, None

    def audited(action: str, relationship: NewFederationRelationship, bundle: bool) -> None:
        audit(
            action,
            f"spiffe://{relationship.trust_domain}",
            {
                "bundle_endpoint_url": relationship.bundle_endpoint_url,
                "bundle_endpoint_profile": relationship.profile,
                "endpoint_spiffe_id": relationship.endpoint_spiffe_id,
                "bundle_given": bundle,
            },
        )

    @router.post("/relationships", status_code=201, responses=error_responses(409))
    def create_relationship(body: RelationshipBody) -> dict[str, Any]:
        relationship, bundle = validated(body)
        created = store.create_federation_relationship(relationship, bundle=bundle)
        audited("federation.create", relationship, bundle is not None)
        if bundle is not None:
            changed()
        return described(created)

    @router.get("/relationships")
    def list_relationships() -> dict[str, Any]:
        return {
            "relationships": [described(r) for r in store.list_federation_relationships()]
        }

    @router.get("/relationships/{name}", responses=error_responses(404))
    def show_relationship(name: str) -> dict[str, Any]:
        td = parse_trust_domain(name)
        return described(store.get_federation_relationship(td.name))

    @router.put("/relationships/{name}", responses=error_responses(404))
    def update_relationship(name: str, body: RelationshipBody) -> dict[str, Any]:
        td = parse_trust_domain(name)
        if parse_trust_domain(body.trust_domain) != td:
            raise InvalidArgument(
                f"the body names trust domain {body.trust_domain}, the path {td.name}; a "
                "relationship's trust domain cannot change (delete it and create another)"
            )
        store.get_federation_relationship(td.name)  # NotFound before validation speaks
        relationship, bundle = validated(body)
        updated = store.update_federation_relationship(relationship, bundle=bundle)
        audited("federation.update", relationship, bundle is not None)
        if bundle is not None:
            changed()
        return described(updated)

    @router.delete("/relationships/{name}", responses=error_responses(404))
    def delete_relationship(name: str) -> dict[str, Any]:
        td = parse_trust_domain(name)
        deleted = store.delete_federation_relationship(td.name)
        audit("federation.delete", td.as_spiffe_id(), None)
        changed()
        return {"trust_domain": deleted.trust_domain, "deleted": True}

    @router.post("/relationships/{name}/refresh", responses=error_responses(404, 503))
    async def refresh(name: str) -> dict[str, Any]:
        td = parse_trust_domain(name)
        relationship = await run_in_threadpool(store.get_federation_relationship, td.name)
        outcome = await refresh_relationship(store, relationship, changed=changed, fetch=fetch)
        if outcome.error is not None:
            raise RefreshFailed(outcome.error)
        await run_in_threadpool(
            audit, "federation.refresh", td.as_spiffe_id(), {"changed": outcome.changed}
        )
        result = relationship_json(outcome.relationship, outcome.bundle)
        result["changed"] = outcome.changed
        return result

    return router
