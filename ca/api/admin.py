"""The admin API, served on the server's Unix socket (its directory is 0700).

Whoever can open the socket is an operator, as with SPIRE's admin socket. The
``tessera server ...`` commands are thin clients of these endpoints; the
OpenAPI schema is at ``/openapi.json`` on the socket.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, FastAPI, Query, Response
from pydantic import Field

from attestor.node.join_token import generate_token
from attestor.selector import Selector
from ca.agent_activity import AgentActivity
from ca.api.errors import BodySizeLimit, RequestBody, error_responses, install_error_handlers
from ca.api.meshconfig import BODY_LIMITS, mesh_router
from ca.authority import Authorities, next_rotation
from ca.datastore.interface import Datastore
from ca.datastore.records import AttestedAgent, Authority, FederationRelationship, JoinToken
from ca.entries import entry_json, new_entry
from ca.federation.api import federation_router
from ca.issuance import Issuer
from ca.proxy_rejections import ProxyRejections
from ca.revisions import RevisionWatcher
from sdk.bundle import TrustBundle
from sdk.clock import Clock
from sdk.durations import parse_duration
from sdk.errors import InvalidArgument
from sdk.spiffeid import parse_spiffe_id, parse_trust_domain, require_member

Kind = Literal["x509", "jwt"]

BUNDLE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The trust bundle: PEM certificates (format=pem) or the SPIFFE bundle, "
        "a JWKS (format=spiffe)",
        "content": {
            "application/x-pem-file": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    },
}


class EntryBody(RequestBody):
    spiffe_id: str = Field(max_length=2048)
    parent_id: str = Field(max_length=2048)
    selectors: list[str] = Field(default_factory=list, max_length=64)
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: list[str] = Field(default_factory=list, max_length=64)
    federates_with: list[str] = Field(default_factory=list, max_length=64)
    admin: bool = False
    downstream: bool = False
    node: bool = False
    hint: str = ""
    expires_at: int | None = None


class TokenBody(RequestBody):
    spiffe_id: str | None = Field(default=None, max_length=2048)
    ttl: int = Field(default=600, gt=0, le=30 * 86400)


class X509MintBody(RequestBody):
    spiffe_id: str = Field(max_length=2048)
    ttl: str | None = None
    dns_names: list[str] = Field(default_factory=list, max_length=64)


class JwtMintBody(RequestBody):
    spiffe_id: str = Field(max_length=2048)
    audience: list[str] = Field(min_length=1, max_length=32)
    ttl: str | None = None


class AgentBody(RequestBody):
    spiffe_id: str = Field(max_length=2048)


class AuthorityBody(RequestBody):
    authority_id: str = Field(min_length=1, max_length=128)


class BundleBody(RequestBody):
    id: str = Field(max_length=300)
    bundle: str = Field(max_length=512 * 1024)
    format: Literal["pem", "spiffe"] = "pem"


def agent_json(agent: AttestedAgent, last_seen: datetime | None = None) -> dict[str, Any]:
    """An agent; ``last_seen``: its last authenticated node API request to *this* server
    (None: none since this server started)."""
    return {
        "spiffe_id": agent.spiffe_id,
        "attestation_type": agent.attestation_type,
        "serial": agent.serial,
        "expires_at": int(agent.expires_at.timestamp()),
        "selectors": [{"type": s.type, "value": s.value} for s in agent.selectors],
        "banned": agent.banned,
        "created_at": int(agent.created_at.timestamp()),
        "last_seen": int(last_seen.timestamp()) if last_seen is not None else None,
    }


def authority_json(authority: Authority) -> dict[str, Any]:
    return {
        "authority_id": authority.authority_id,
        "kind": authority.kind,
        "status": authority.status,
        "server_id": authority.server_id,
        "key_type": authority.key_type,
        "not_before": int(authority.not_before.timestamp()),
        "expires_at": int(authority.not_after.timestamp()),
        "tainted": authority.tainted,
        "upstream": bool(authority.upstream_roots),
    }


def create_admin_app(
    *,
    store: Datastore,
    authorities: Authorities,
    issuer: Issuer,
    clock: Clock,
    changed: Callable[[], None],
    health: Callable[[], dict[str, Any]],
    rejections: ProxyRejections | None = None,
    activity: AgentActivity | None = None,
    watcher: RevisionWatcher | None = None,
) -> FastAPI:
    trust_domain = authorities.policy.trust_domain
    app = FastAPI(title="Tessera admin API", version="1")
    install_error_handlers(app)
    router = APIRouter(prefix="/v1")
    activity = activity if activity is not None else AgentActivity(clock)

    def agent_out(agent: AttestedAgent) -> dict[str, Any]:
        return agent_json(agent, activity.last_seen(agent.spiffe_id))

    def audit(action: str, target: str, details: dict[str, Any] | None = None) -> None:
        store.append_audit(actor="admin", action=action, target=target, details=details)

    @router.get("/health", responses=error_responses(503))
    def get_health() -> dict[str, Any]:
        store.ping()
        return health()

    # -- entries ------------------------------------------------------------------

    def build_entry(body: EntryBody) -> Any:
        return new_entry(trust_domain, **body.model_dump())

    @router.post("/entries", status_code=201, responses=error_responses(409))
    def create_entry(body: EntryBody) -> dict[str, Any]:
        entry = store.create_entry(build_entry(body), audited_by="admin")
        changed()
        return entry_json(entry)

    @router.get("/entries")
    def list_entries(
        spiffe_id: str | None = None,
        parent_id: str | None = None,
        selector: Annotated[list[str] | None, Query()] = None,
    ) -> dict[str, Any]:
        selectors = [Selector.parse(s) for s in selector or []] or None
        for value, what in ((spiffe_id, "SPIFFE ID"), (parent_id, "parent ID")):
            if value is not None:
                parse_spiffe_id(value, what=what)
        entries = store.list_entries(spiffe_id=spiffe_id, parent_id=parent_id, selectors=selectors)
        return {"entries": [entry_json(e) for e in entries]}

    @router.get("/entries/search")
    def search_entries(
        q: str = Query("", max_length=2048),
        parent_id: str = Query("", max_length=2048),
        selector: Annotated[list[str] | None, Query(max_length=32)] = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=10_000_000),
    ) -> dict[str, Any]:
        """A page of entries whose SPIFFE ID contains ``q`` (or whose ID is ``q``), of
        ``parent_id``, with every ``selector``; by SPIFFE ID. ``total`` counts them all."""
        selectors = [Selector.parse(s) for s in selector or []] or None
        if parent_id:
            parse_spiffe_id(parent_id, what="parent ID")
        found, total = store.search_entries(text=q.strip() or None, parent_id=parent_id or None,
                                            selectors=selectors, limit=limit, offset=offset)
        return {"entries": [entry_json(e) for e in found], "total": total}

    @router.get("/entries/count")
    def count_entries() -> dict[str, int]:
        return {"count": store.count_entries()}

    @router.get("/entries/{entry_id}", responses=error_responses(404))
    def get_entry(entry_id: str) -> dict[str, Any]:
        return entry_json(store.get_entry(entry_id))

    @router.put("/entries/{entry_id}", responses=error_responses(404, 409))
    def update_entry(entry_id: str, body: EntryBody) -> dict[str, Any]:
        entry = store.update_entry(entry_id, build_entry(body), audited_by="admin")
        changed()
        return entry_json(entry)

    @router.delete("/entries/{entry_id}", responses=error_responses(404))
    def delete_entry(entry_id: str) -> dict[str, Any]:
        entry = store.delete_entry(entry_id, audited_by="admin")
        changed()
        return {"id": entry.id, "deleted": True}

    # -- agents -------------------------------------------------------------------

    @router.get("/agents")
    def list_agents() -> dict[str, Any]:
        return {"agents": [agent_out(a) for a in store.list_agents()]}

    @router.get("/agents/count")
    def count_agents() -> dict[str, int]:
        return {"count": store.count_agents()}

    @router.post("/agents/evict", responses=error_responses(404))
    def evict_agent(body: AgentBody) -> dict[str, Any]:
        parse_spiffe_id(body.spiffe_id)
        store.delete_agent(body.spiffe_id)
        audit("agent.evict", body.spiffe_id)
        changed()
        return {"spiffe_id": body.spiffe_id, "evicted": True}

    @router.post("/agents/ban", responses=error_responses(404))
    def ban_agent(body: AgentBody) -> dict[str, Any]:
        parse_spiffe_id(body.spiffe_id)
        agent = store.set_agent_banned(body.spiffe_id, True)
        audit("agent.ban", body.spiffe_id)
        changed()
        return agent_json(agent)

    @router.post("/agents/unban", responses=error_responses(404))
    def unban_agent(body: AgentBody) -> dict[str, Any]:
        parse_spiffe_id(body.spiffe_id)
        agent = store.set_agent_banned(body.spiffe_id, False)
        audit("agent.unban", body.spiffe_id)
        changed()
        return agent_json(agent)

    @router.get("/agents/show", responses=error_responses(404))
    def show_agent(spiffe_id: str) -> dict[str, Any]:
        parse_spiffe_id(spiffe_id)
        agent = store.get_agent(spiffe_id)
        result = agent_out(agent)
        result["aliases"] = sorted(store.agent_aliases(spiffe_id))
        return result

    # -- issued SVIDs ---------------------------------------------------------------

    @router.get("/svids")
    def list_svids(
        spiffe_id: str | None = Query(None, max_length=2048),
        agent_id: str | None = Query(None, max_length=2048),
        expiring_within: int | None = Query(None, ge=0, le=10 * 365 * 86400),
        limit: int = Query(200, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Issued SVIDs still valid (of ``spiffe_id``, asked by ``agent_id``): expiring
        within ``expiring_within`` seconds, soonest first; otherwise the newest first."""
        now = clock.now()
        before = now + timedelta(seconds=expiring_within) if expiring_within is not None else None
        found, total = store.list_issued_svids(valid_at=now, expiring_before=before,
                                               spiffe_id=spiffe_id, agent_id=agent_id,
                                               limit=limit)  # fmt: skip
        return {"svids": [{"serial": s.serial, "spiffe_id": s.spiffe_id, "kind": s.kind,
                           "agent_id": s.agent_id, "authority_id": s.authority_id,
                           "expires_at": int(s.expires_at.timestamp())} for s in found],
                "total": total}  # fmt: skip

    # -- the whole trust domain, and its changes --------------------------------------

    @router.get("/trustdomain")
    def show_trust_domain() -> dict[str, Any]:
        """What the console's trust-domain page shows, in one answer: this server's
        authorities of each kind with the next rotation's steps, the bundle sequence and
        the federated trust domains."""
        relationships = {r.trust_domain: r for r in store.list_federation_relationships()}
        federated = []
        for bundle in store.list_federated_bundles():
            relationship = relationships.get(bundle.trust_domain)
            federated.append({
                "trust_domain": bundle.trust_domain,
                "updated_at": int(bundle.updated_at.timestamp()),
                "bundle_endpoint_url": relationship.bundle_endpoint_url if relationship else None,
                "last_refresh": _refresh_text(relationship),
            })
        kinds: dict[str, Any] = {}
        steps: dict[str, Any] = {}
        for kind in ("x509", "jwt"):
            own = authorities.list_authorities(kind)
            kinds[kind] = [authority_json(a) for a in own]
            step = next_rotation(own)
            steps[kind] = {"prepare_at": _unix(step.prepare_at),
                           "activate_at": _unix(step.activate_at)}
        return {"trust_domain": trust_domain.name, "bundle_sequence": store.bundle_sequence(),
                "authorities": kinds, "next_rotation": steps, "federated": federated}

    @router.get("/watch")
    async def watch(
        since: str | None = Query(None, max_length=200),
        timeout: float = Query(25.0, ge=0, le=60),
    ) -> dict[str, Any]:
        """The change counters (entries, bundle, agents, mesh) as a token; with ``since``
        (a token), held until one of them moves or ``timeout`` seconds pass, and which
        moved."""
        if watcher is None:
            current = store.sync_counters()
            return {"token": _watch_token(current), "changed": []}
        if since is None:
            return {"token": _watch_token(watcher.counters), "changed": []}
        seen = _parse_watch_token(since)
        now = await watcher.wait_changed(seen, timeout)
        names = ("entries", "bundle", "agents", "mesh")
        return {"token": _watch_token(now),
                "changed": [n for n, a, b in zip(names, seen, now, strict=True) if a != b]}

    # -- join tokens --------------------------------------------------------------

    @router.post("/tokens", status_code=201)
    def create_token(body: TokenBody) -> dict[str, Any]:
        if body.spiffe_id is not None:
            alias = parse_spiffe_id(body.spiffe_id)
            require_member(alias, trust_domain, what="SPIFFE ID")
        token: JoinToken = store.create_join_token(
            generate_token(),
            alias_id=body.spiffe_id,
            expires_at=clock.now() + timedelta(seconds=body.ttl),
        )
        audit("token.generate", body.spiffe_id or "", {"ttl": body.ttl})
        return {
            "token": token.token,
            "spiffe_id": token.alias_id,
            "expires_at": int(token.expires_at.timestamp()),
        }

    # -- bundles ------------------------------------------------------------------

    @router.get("/bundle", response_class=Response, responses=BUNDLE_RESPONSES)
    def show_bundle(format: Literal["pem", "spiffe"] = "pem") -> Response:
        bundle = authorities.bundle()
        if format == "pem":
            return Response(bundle.to_pem(), media_type="application/x-pem-file")
        return Response(bundle.to_spiffe_json(), media_type="application/json")

    @router.get("/bundles/federated")
    def list_federated(format: Literal["pem", "spiffe"] = "pem") -> dict[str, Any]:
        result = {}
        for federated in store.list_federated_bundles():
            td = parse_trust_domain(federated.trust_domain)
            parsed = TrustBundle.from_spiffe_json(td, federated.bundle)
            result[td.as_spiffe_id()] = (
                parsed.to_pem().decode() if format == "pem" else json.loads(federated.bundle)
            )
        return {"bundles": result}

    @router.put("/bundles/federated")
    def set_federated(body: BundleBody) -> dict[str, Any]:
        td = parse_trust_domain(body.id)
        if td == trust_domain:
            raise InvalidArgument(
                "that is this server's own trust domain; a federated bundle must be another one"
            )
        data = body.bundle.encode()
        parsed = (
            TrustBundle.from_pem(td, data)
            if body.format == "pem"
            else TrustBundle.from_spiffe_json(td, data)
        )
        if not parsed.x509_authorities and not parsed.jwt_authorities:
            raise InvalidArgument("the bundle holds no authorities")
        store.set_federated_bundle(td.name, parsed.to_spiffe_json())
        store.bump_bundle_sequence()  # agents re-fetch bundles when the sequence moves
        audit("bundle.set", td.as_spiffe_id())
        changed()
        return {"id": td.as_spiffe_id(), "x509_authorities": len(parsed.x509_authorities)}

    @router.delete("/bundles/federated", responses=error_responses(404))
    def delete_federated(id: str) -> dict[str, Any]:
        td = parse_trust_domain(id)
        store.get_federated_bundle(td.name)
        store.delete_federated_bundle(td.name)
        store.bump_bundle_sequence()
        audit("bundle.delete", td.as_spiffe_id())
        changed()
        return {"id": td.as_spiffe_id(), "deleted": True}

    # -- minting ------------------------------------------------------------------

    @router.post("/x509/mint", responses=error_responses(412))
    def mint_x509(body: X509MintBody) -> dict[str, Any]:
        ttl = parse_duration(body.ttl, what="ttl") if body.ttl else None
        issued, key = issuer.mint_x509(body.spiffe_id, ttl=ttl, dns_names=body.dns_names)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {
            "spiffe_id": str(issued.spiffe_id),
            "svid": issued.chain_pem().decode(),
            "key": key_pem.decode(),
            "bundle": authorities.bundle().to_pem().decode(),
            "expires_at": int(issued.expires_at.timestamp()),
            "serial": format(issued.leaf.serial_number, "x"),
        }

    @router.post("/jwt/mint", responses=error_responses(412))
    def mint_jwt(body: JwtMintBody) -> dict[str, Any]:
        ttl = parse_duration(body.ttl, what="ttl") if body.ttl else None
        token, expires_at = issuer.mint_jwt(body.spiffe_id, body.audience, ttl=ttl)
        return {"token": token, "expires_at": int(expires_at.timestamp())}

    # -- local authorities --------------------------------------------------------

    @router.get("/localauthority/{kind}")
    def show_authorities(kind: Kind) -> dict[str, Any]:
        return {"authorities": [authority_json(a) for a in authorities.list_authorities(kind)]}

    @router.post("/localauthority/{kind}/prepare", responses=error_responses(412))
    def prepare(kind: Kind) -> dict[str, Any]:
        result = authority_json(authorities.prepare(kind))
        changed()
        return result

    @router.post("/localauthority/{kind}/activate", responses=error_responses(412))
    def activate(kind: Kind) -> dict[str, Any]:
        result = authority_json(authorities.activate(kind))
        changed()
        return result

    @router.post("/localauthority/{kind}/taint", responses=error_responses(404, 412))
    def taint(kind: Kind, body: AuthorityBody) -> dict[str, Any]:
        result = authority_json(authorities.taint(kind, body.authority_id))
        changed()
        return result

    @router.post("/localauthority/{kind}/revoke", responses=error_responses(404, 412))
    def revoke(kind: Kind, body: AuthorityBody) -> dict[str, Any]:
        result = authority_json(authorities.revoke(kind, body.authority_id))
        changed()
        return result

    # -- audit log ----------------------------------------------------------------

    @router.get("/audit")
    def list_audit(limit: int = Query(100, ge=1, le=10000)) -> dict[str, Any]:
        return {
            "events": [
                {
                    "id": e.id,
                    "at": e.at.isoformat(),
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "details": e.details,
                    "hash": e.hash,
                }
                for e in store.list_audit(limit=limit)
            ]
        }

    @router.post("/audit/verify")
    def verify_audit() -> dict[str, Any]:
        result = store.verify_audit()
        return {
            "intact": result.intact,
            "checked": result.checked,
            "event_id": result.event_id,
            "problem": result.problem,
        }

    app.include_router(router)
    app.include_router(
        federation_router(store=store, trust_domain=trust_domain, changed=changed, audit=audit)
    )
    app.include_router(mesh_router(
        store=store, changed=changed,
        rejections=rejections if rejections is not None else ProxyRejections(clock),
    ))  # fmt: skip
    app.add_middleware(BodySizeLimit, paths=BODY_LIMITS)
    return app


def _unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def _refresh_text(relationship: FederationRelationship | None) -> str | None:
    if relationship is None or relationship.last_refresh_at is None:
        return None
    at = relationship.last_refresh_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{at}: {relationship.last_error}" if relationship.last_error else f"{at}: ok"


def _watch_token(counters: tuple[int, int, int, int]) -> str:
    return ".".join(str(n) for n in counters)


def _parse_watch_token(token: str) -> tuple[int, int, int, int]:
    parts = token.split(".")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts):
        raise InvalidArgument(f"since {token!r} is not a token /v1/watch gave (four numbers "
                              "joined by dots)")
    a, b, c, d = (int(p) for p in parts)
    return a, b, c, d
