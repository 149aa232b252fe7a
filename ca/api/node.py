"""The node API: what agents call, over mTLS, authenticated by their SVID.

    POST /v1/agent/attest        attest with node evidence, get the agent SVID
    POST /v1/agent/renew         renew the calling agent's SVID
    GET  /v1/agent/entries       entries authorized for the caller since a revision;
                                 ?wait=N holds the request until something changes
    GET  /v1/agent/mesh          the mesh configuration's changes since a mesh revision
    PUT  /v1/agent/instances     the mesh instances on the agent's node, with their health,
                                 and the NACKs of its Envoys
    POST /v1/agent/svids/x509    sign a batch of CSRs, one per authorized entry
    POST /v1/agent/svids/jwt     mint a JWT-SVID for an authorized entry
    GET  /v1/agent/bundles       the trust bundle and the federated bundles
    GET  /v1/bundle              the trust bundle (SPIFFE format; public)
    GET  /live, /ready, /metrics health and Prometheus metrics (no client cert needed)

The caller's identity is read only from the TLS handshake (see ca.api.tls).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from functools import lru_cache
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from attestor.node import AttestationResult, Challenge, NodeAttestationError, NodeAttestorServer
from ca import metrics
from ca.agent_activity import AgentActivity
from ca.agent_cache import AgentCache
from ca.api.errors import (
    BodySizeLimit,
    install_error_handlers,
    tessera_error_response,
    unexpected_error_response,
)
from ca.api.tls import peer_spiffe_id
from ca.authority import Authorities
from ca.csr import parse_csr
from ca.datastore.interface import Datastore
from ca.datastore.records import AttestedAgent, AuditNote, MeshChanges, ReportedInstance
from ca.entries import entry_json
from ca.errors import AgentBanned
from ca.issuance import IssuedX509, Issuer
from ca.proxy_rejections import (
    MAX_REASON_CHARS,
    MAX_REJECTIONS_PER_AGENT,
    ProxyRejection,
    ProxyRejections,
)
from ca.revisions import RevisionWatcher
from mesh import Config
from mesh.catalog import MAX_HEALTH_DETAIL, one_line
from mesh.registration import MAX_LABELS, label_problem, registration_problem
from sdk.address import HostPort
from sdk.bundle import TrustBundle
from sdk.clock import SYSTEM_CLOCK
from sdk.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TesseraError,
    Unauthenticated,
)
from sdk.jwtsvid import check_audiences
from sdk.spiffeid import SpiffeId

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 60.0
MAX_INSTANCES_PER_AGENT = 256
"""Mesh instances one agent may register: a node's worth, with room to spare."""
INLINE_CSRS = 4
"""A batch of at most this many CSRs is signed on the event loop when all it needs is in
memory (about 0.3 ms of CPU per CSR, less than a trip to a worker thread and back)."""
SVIDS_X509 = "/v1/agent/svids/x509"
SMALL_BODY_BYTES = 64 * 1024
"""A body the node API's short way reads, at most; a larger one goes FastAPI's way."""


class AttestRequest(BaseModel):
    attestation_type: str = Field(max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict)
    challenge_response: dict[str, Any] | None = None
    csr: str = Field(max_length=32768)


class RenewRequest(BaseModel):
    csr: str = Field(max_length=32768)


class CsrRequest(BaseModel):
    entry_id: str = Field(max_length=64)
    csr: str = Field(max_length=32768)


class BatchRequest(BaseModel):
    requests: list[CsrRequest] = Field(max_length=500)


class ReportedInstanceModel(BaseModel):
    service: str = Field(max_length=63)
    address: str = Field(max_length=300)
    spiffe_id: str = Field(max_length=2048)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    health: Literal["healthy", "unhealthy", "unknown"]
    detail: str | None = Field(None, max_length=MAX_HEALTH_DETAIL)
    """Why it is unhealthy (kept only with ``unhealthy``)."""


class ReportedRejectionModel(BaseModel):
    """A NACK still standing among the agent's Envoys (:mod:`ca.proxy_rejections`)."""

    node_id: str = Field(min_length=1, max_length=256)
    proxy: Literal["sidecar", "gateway", ""] = ""
    service: str = Field("", max_length=63)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    spiffe_id: str = Field("", max_length=2048)
    type_url: str = Field(min_length=1, max_length=200)
    version: str = Field("", max_length=128)
    reason: str = Field(max_length=MAX_REASON_CHARS)
    at: AwareDatetime


class InstancesReport(BaseModel):
    instances: list[ReportedInstanceModel] = Field(max_length=MAX_INSTANCES_PER_AGENT)
    rejections: list[ReportedRejectionModel] = Field(
        default_factory=list, max_length=MAX_REJECTIONS_PER_AGENT
    )


class JwtRequest(BaseModel):
    entry_id: str = Field(max_length=64)
    audience: list[str] = Field(min_length=1)  # bounded by check_audiences, with a sentence


def _csr_pairs(body: BatchRequest) -> list[tuple[str, bytes]]:
    return [(r.entry_id, decode_b64(r.csr, f"csr of entry {r.entry_id}")) for r in body.requests]


def decode_b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidArgument(f"{what} is not valid base64") from err


def svid_json(issued: IssuedX509) -> dict[str, Any]:
    leaf, *intermediates = issued.chain_der()
    return {
        "entry_id": issued.entry_id,
        "spiffe_id": str(issued.spiffe_id),
        "cert_chain": [_base64(leaf), *map(_authority_base64, intermediates)],
        "expires_at": int(issued.expires_at.timestamp()),
    }


def mesh_changes_json(changes: MeshChanges) -> dict[str, Any]:
    """The answer of ``GET /v1/agent/mesh``."""
    return {
        "revision": changes.revision,
        "full": changes.full,
        "instances": [instance.to_json() for instance in changes.instances],
        "removed_instances": [
            {"node": key.node, "service": key.service, "address": key.address}
            for key in changes.removed_instances
        ],
        "resources": [
            {"kind": r.kind, "name": r.name, "revision": r.revision, "document": r.document}
            for r in changes.resources
            if not r.deleted
        ],
        "deleted": [
            {"kind": r.kind, "name": r.name, "revision": r.revision}
            for r in changes.resources
            if r.deleted
        ],
    }


def _judge_instance(
    item: ReportedInstanceModel, config: Config, hosted: set[str], agent_id: str
) -> tuple[str | None, ReportedInstance | None]:
    """(why it is refused, None) or (None, the instance to keep)."""
    problem = registration_problem(config, item.service, item.spiffe_id)
    if problem is not None:
        return problem.reason, None
    if item.spiffe_id not in hosted:
        return (
            f"agent {agent_id} hosts no workload with SPIFFE ID {item.spiffe_id} (no "
            "registration entry gives a workload on its node that ID)"
        ), None
    if (label_reason := label_problem(item.labels)) is not None:
        return label_reason, None
    try:
        address = HostPort.parse(item.address, what="instance address")
    except ConfigError as err:
        return err.message, None
    return None, ReportedInstance(
        service=item.service,
        address=address,
        spiffe_id=item.spiffe_id,
        labels=item.labels,
        health=item.health,
        detail=(
            one_line(item.detail, MAX_HEALTH_DETAIL) or None
            if item.health == "unhealthy" and item.detail
            else None
        ),
    )


def _rejection(agent_id: str, item: ReportedRejectionModel) -> ProxyRejection:
    """A reported NACK as the server keeps it: its texts on one line (a terminal prints
    them), labels dropped unless they are labels."""
    return ProxyRejection(
        agent=agent_id,
        node_id=one_line(item.node_id, 256),
        proxy=item.proxy,
        service=item.service,
        labels=item.labels if label_problem(item.labels) is None else {},
        spiffe_id=item.spiffe_id,
        type_url=one_line(item.type_url, 200),
        version=one_line(item.version, 128),
        reason=one_line(item.reason, MAX_REASON_CHARS),
        at=item.at,
    )


def _base64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _compact_json(value: Any) -> bytes:
    """``value`` as FastAPI's default answer encodes it: no spaces, UTF-8."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


@lru_cache(maxsize=16)
def _authority_base64(der: bytes) -> str:
    """An intermediate in base64: the same few go out with every SVID of a batch."""
    return _base64(der)


class NodeApi(FastAPI):
    """The node API's FastAPI app, with a short way for what agents send most: a small
    batch of CSRs (``POST /v1/agent/svids/x509``), which otherwise spent about a third
    of its CPU in FastAPI's middleware, routing and body handling.

    The short way reads the body (up to :data:`SMALL_BODY_BYTES`) and hands it to
    ``small_batch``, which answers it, or says None, before doing anything, when the
    request is not one it takes (a body that is not a valid small batch, a caller not
    in memory): then the request goes through FastAPI with the body as received, so
    every refusal is FastAPI's as before. An error once it has begun is answered as the
    app's error handlers answer it.
    """

    small_batch: Callable[[Scope, bytes], Awaitable[Response | None]] | None = None
    endpoints: frozenset[str] = frozenset()
    """The routes' paths, each its own label in the request counter."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            send = self._counted(scope["path"], send)
        if (
            self.small_batch is None
            or scope["type"] != "http"
            or scope["path"] != SVIDS_X509
            or scope["method"] != "POST"
            or not _small_json(scope)
        ):
            await super().__call__(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more and size <= SMALL_BODY_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        answer = None if more else await self.small_batch(scope, body)
        if answer is None:
            await super().__call__(scope, _replay(body, more, receive), send)
            return
        await send(
            {"type": "http.response.start", "status": answer.status_code,
             "headers": answer.raw_headers}
        )  # fmt: skip
        await send({"type": "http.response.body", "body": answer.body})


    def _counted(self, path: str, send: Send) -> Send:
        """``send``, counting the answer in ``tessera_server_node_api_requests_total`` by
        endpoint (a route's path; ``other`` for any other, so callers cannot grow the
        label set) and status."""
        endpoint = path if path in self.endpoints else "other"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                key = (endpoint, message["status"])
                counter = _REQUEST_COUNTERS.get(key)
                if counter is None:
                    counter = _REQUEST_COUNTERS[key] = metrics.NODE_API_REQUESTS.labels(
                        endpoint, str(message["status"]))
                counter.inc()
            await send(message)

        return counted


_REQUEST_COUNTERS: dict[tuple[str, int], Any] = {}
"""The counter of each (endpoint, status) met, resolved once."""


def _small_json(scope: Scope) -> bool:
    """The request says its body is JSON, of at most :data:`SMALL_BODY_BYTES`."""
    json_body = False
    for name, value in scope["headers"]:
        if name == b"content-type":
            json_body = value == b"application/json"
        elif name == b"content-length" and (not value.isdigit() or int(value) > SMALL_BODY_BYTES):
            return False
    return json_body


def _replay(body: bytes, more: bool, receive: Receive) -> Receive:
    """``receive`` giving ``body`` (read already) first, then what follows it."""
    replayed = False

    async def again() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": more}

    return again


def create_node_app(
    *,
    store: Datastore,
    authorities: Authorities,
    issuer: Issuer,
    attestors: Mapping[str, NodeAttestorServer],
    watcher: RevisionWatcher,
    ready: Any,
    instance_lease: timedelta = timedelta(seconds=30),
    rejections: ProxyRejections | None = None,
    activity: AgentActivity | None = None,
) -> NodeApi:
    app = NodeApi(title="Tessera node API", version="1", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    router = APIRouter()
    agents = AgentCache(store, watcher)
    rejections = rejections if rejections is not None else ProxyRejections(SYSTEM_CLOCK)
    activity = activity if activity is not None else AgentActivity(SYSTEM_CLOCK)

    def current_bundle() -> TrustBundle:
        """The bundle, re-read when the watcher has seen a newer sequence than the cache."""
        bundle = authorities.bundle()
        if watcher.bundle_sequence != bundle.sequence:
            authorities.refresh_bundle()
            bundle = authorities.bundle()
        return bundle

    def caller(request: Request) -> AttestedAgent:
        spiffe_id, cert = peer_spiffe_id(request.scope)
        agent = agents.agent_or_refuse(spiffe_id, cert.serial_number)
        activity.seen(agent.spiffe_id)
        return agent

    @router.post("/v1/agent/attest")
    def attest(body: AttestRequest) -> dict[str, Any]:
        attestor = attestors.get(body.attestation_type)
        if attestor is None:
            known = ", ".join(sorted(attestors)) or "none"
            raise InvalidArgument(
                f"node attestation type {body.attestation_type!r} is not enabled on this "
                f"server; enabled: {known}"
            )
        csr = decode_b64(body.csr, "csr")
        parse_csr(csr)  # a garbage CSR is refused before the evidence is even looked at
        try:
            outcome = attestor.attest(body.payload, body.challenge_response)
            if isinstance(outcome, Challenge):
                return {"challenge": dict(outcome.data)}
            return _admit(body.attestation_type, outcome, csr)
        except AgentBanned:
            metrics.ATTESTATIONS.labels(body.attestation_type, "banned").inc()
            raise
        except Exception:
            metrics.ATTESTATIONS.labels(body.attestation_type, "refused").inc()
            raise

    def _admit(attestation_type: str, result: AttestationResult, csr: bytes) -> dict[str, Any]:
        """Check everything, sign, then record the agent and redeem its join token (if it
        used one) in one transaction: a refusal at any step leaves the token usable."""
        agent_id = str(result.agent_id)
        try:
            existing = store.get_agent(agent_id)
        except NotFound:
            existing = None
        if existing is not None and existing.banned:
            raise AgentBanned(
                f"agent {agent_id} is banned; an operator must unban it before it can attest"
            )
        issued = issuer.sign_agent_svid(result.agent_id, csr)  # refuses a bad CSR first
        try:
            _register(attestation_type, result, issued)
        except (NotFound, FailedPrecondition) as err:  # another attestation took the token
            raise NodeAttestationError(f"join token was refused: {err.message}") from err
        watcher.poke()
        metrics.ATTESTATIONS.labels(attestation_type, "ok").inc()
        metrics.SVIDS_ISSUED.labels("x509").inc()
        return {
            "spiffe_id": agent_id,
            "svid": svid_json(issued),
            "bundle": json.loads(authorities.bundle().to_spiffe_json()),
            "reattestable": result.can_reattest,
        }

    def _register(attestation_type: str, result: AttestationResult, issued: IssuedX509) -> None:
        agent_id = str(result.agent_id)
        store.register_agent(
            agent_id,
            attestation_type=attestation_type,
            serial=format(issued.serial_number, "x"),
            expires_at=issued.expires_at,
            selectors=result.selectors,
            aliases=result.aliases,
            join_token=result.join_token,
            audit=AuditNote(
                actor=agent_id,
                action="agent.attest",
                target=agent_id,
                details={"type": attestation_type, "aliases": list(result.aliases)},
            ),
        )

    @router.post("/v1/agent/renew")
    def renew(request: Request, body: RenewRequest) -> dict[str, Any]:
        agent = caller(request)
        issued = issuer.sign_agent_svid(SpiffeId(agent.spiffe_id), decode_b64(body.csr, "csr"))
        store.update_agent_serial(
            agent.spiffe_id, format(issued.serial_number, "x"), issued.expires_at
        )
        metrics.SVIDS_ISSUED.labels("x509").inc()
        return {"svid": svid_json(issued)}

    @router.get("/v1/agent/entries")
    async def entries(
        request: Request,
        since: int = Query(0, ge=0),
        bundle: int | None = Query(None, ge=0),
        mesh: int | None = Query(None, ge=0),
        wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_SECONDS),
    ) -> dict[str, Any]:
        """Entries changed since revision ``since``. With ``wait``, the request is held
        until the entries, or (when ``bundle`` names the sequence the agent has) the
        bundle, or (when ``mesh`` names the mesh revision it has) the mesh configuration
        change. The answer's ``mesh_revision`` tells the agent to fetch the mesh's
        changes (``/v1/agent/mesh``) when it differs from its own."""
        unchanged = (
            since == watcher.revision
            and bundle in (None, watcher.bundle_sequence)
            and (mesh is None or mesh >= watcher.mesh_revision)
        )
        if not (wait and since and unchanged):
            # One trip to the thread pool: this is what every idle agent sync costs.
            return await run_in_threadpool(_caller_entries_since, request, since)
        await run_in_threadpool(caller, request)
        metrics.LONG_POLLS.inc()
        try:
            await watcher.wait_past(since, wait, seen_bundle=bundle, seen_mesh=mesh)
        finally:
            metrics.LONG_POLLS.dec()
        # Checked again after the wait: an agent evicted or banned meanwhile is refused,
        # not answered as if it no longer had any entry.
        return await run_in_threadpool(_caller_entries_since, request, since)

    def _caller_entries_since(request: Request, since: int) -> dict[str, Any]:
        return _entries_since(caller(request), since)

    def _entries_since(agent: AttestedAgent, since: int) -> dict[str, Any]:
        # An agent at the revision the watcher follows is idle: no query needed.
        if since and since == watcher.revision and watcher.following:
            revision = since
        else:
            revision = store.current_revision()
        authorized = issuer.authorized_entries(agent, revision=revision)
        full = since == 0 or since > revision
        changed = [e for e in authorized if full or e.revision > since]
        return {
            "revision": revision,
            "entries": [entry_json(e) for e in changed],
            "entry_ids": [e.id for e in authorized],
            "bundle_sequence": current_bundle().sequence,
            "tainted_authorities": authorities.tainted_ids(),
            "mesh_revision": (
                watcher.mesh_revision if watcher.following else store.mesh_revision()
            ),
        }

    @router.get("/v1/agent/mesh")
    def mesh_changes(request: Request, since: int = Query(0, ge=0)) -> Response:
        """The mesh configuration's resources changed (and deleted) since mesh revision
        ``since``; ``full`` when the answer is the whole configuration, to replace what
        the agent has (``since`` 0, or older than the tombstones kept)."""
        caller(request)
        return Response(
            _compact_json(mesh_changes_json(store.mesh_changed_since(since))),
            media_type="application/json",
        )

    @router.put("/v1/agent/instances")
    def report_instances(request: Request, body: InstancesReport) -> dict[str, Any]:
        """The whole set of mesh instances on the caller's node, with their health. Each
        one is kept only when its Service allows its SPIFFE ID and the agent hosts a
        workload with that ID; the others are named in ``refused`` with the reason. Also
        renews the lease of what is kept (``lease_seconds``: report again well within it).
        ``rejections``, the NACKs still standing among the node's Envoys, replace the
        agent's previous list, kept in memory for as long (:mod:`ca.proxy_rejections`)."""
        agent = caller(request)
        config, _ = store.mesh_config()
        hosted = {entry.spiffe_id for entry in issuer.authorized_entries(agent)}
        accepted: list[ReportedInstance] = []
        refused: list[dict[str, str]] = []
        seen: set[tuple[str, str]] = set()
        for item in body.instances:
            reason, instance = _judge_instance(item, config, hosted, agent.spiffe_id)
            if instance is not None and (item.service, str(instance.address)) in seen:
                reason, instance = f"{item.service} {instance.address} is reported twice", None
            if instance is None:
                refused.append({"service": item.service, "address": item.address,
                                "reason": reason or "refused"})  # fmt: skip
                continue
            seen.add((instance.service, str(instance.address)))
            accepted.append(instance)
        before = watcher.mesh_revision
        revision = store.report_mesh_instances(agent.spiffe_id, accepted, lease=instance_lease)
        rejections.report(
            agent.spiffe_id,
            [_rejection(agent.spiffe_id, item) for item in body.rejections],
            lease=instance_lease,
        )
        if revision != before:
            watcher.poke()
        return {
            "revision": revision,
            "lease_seconds": instance_lease.total_seconds(),
            "refused": refused,
        }

    @router.post(SVIDS_X509)
    async def sign_x509(request: Request, body: BatchRequest) -> Response:
        started = time.perf_counter()
        if len(body.requests) <= INLINE_CSRS:
            # A small batch whose agent and entries are in memory is signed here: that
            # costs less than the trip to a worker thread and back.
            spiffe_id, cert = peer_spiffe_id(request.scope)
            agent = agents.cached(spiffe_id, cert.serial_number)
            if agent is not None:
                activity.seen(agent.spiffe_id)
                issued = await issuer.sign_batch_async(agent, _csr_pairs(body))
                if issued is not None:
                    return _issued(issued, started)
        return await run_in_threadpool(_sign_x509, request, body, started)

    async def small_batch(scope: Scope, raw: bytes) -> Response | None:
        """``sign_x509``'s answer when it is all done on the event loop; None, having done
        nothing, for FastAPI to take the request (and say what is wrong, if anything)."""
        started = time.perf_counter()
        try:
            body = BatchRequest.model_validate_json(raw)
            if len(body.requests) > INLINE_CSRS:
                return None
            spiffe_id, cert = peer_spiffe_id(scope)
            pairs = _csr_pairs(body)
        except (ValidationError, Unauthenticated, InvalidArgument):
            return None
        agent = agents.cached(spiffe_id, cert.serial_number)
        if agent is None:
            return None
        activity.seen(agent.spiffe_id)
        try:
            issued = await issuer.sign_batch_async(agent, pairs)
        except TesseraError as error:
            return tessera_error_response("POST", SVIDS_X509, error)
        except Exception:
            return unexpected_error_response("POST", SVIDS_X509)
        return None if issued is None else _issued(issued, started)

    app.small_batch = small_batch

    def _sign_x509(request: Request, body: BatchRequest, started: float) -> Response:
        agent = caller(request)
        return _issued(issuer.sign_batch(agent, _csr_pairs(body)), started)

    def _issued(issued: list[IssuedX509], started: float) -> Response:
        metrics.ISSUANCE_SECONDS.observe(time.perf_counter() - started)
        metrics.SVIDS_ISSUED.labels("x509").inc(len(issued))
        # Encoded here, as FastAPI would encode a dict answer, but without its validation
        # and re-encoding of every SVID of the batch (and the thread-pool trip it takes).
        return Response(
            _compact_json({"svids": [svid_json(i) for i in issued]}),
            media_type="application/json",
        )

    @router.post("/v1/agent/svids/jwt")
    def sign_jwt(request: Request, body: JwtRequest) -> dict[str, Any]:
        agent = caller(request)
        check_audiences(body.audience)
        spiffe_id, token, expires_at = issuer.jwt_for_agent(agent, body.entry_id, body.audience)
        metrics.SVIDS_ISSUED.labels("jwt").inc()
        return {"spiffe_id": spiffe_id, "token": token, "expires_at": int(expires_at.timestamp())}

    @router.get("/v1/agent/bundles")
    def bundles(request: Request) -> dict[str, Any]:
        caller(request)
        federated = {
            f.trust_domain: json.loads(f.bundle) for f in store.list_federated_bundles()
        }
        return {
            "bundle": json.loads(current_bundle().to_spiffe_json()),
            "federated": federated,
        }

    @router.get("/v1/bundle")
    def bundle() -> Response:
        return Response(authorities.bundle().to_spiffe_json(), media_type="application/json")

    @router.get("/live")
    def live() -> dict[str, str]:
        return {"status": "live"}

    @router.get("/ready")
    def ready_check() -> Response:
        problem = ready()
        if problem:
            return Response(
                json.dumps({"status": "not ready", "reason": problem}),
                status_code=503,
                media_type="application/json",
            )
        return Response(json.dumps({"status": "ready"}), media_type="application/json")

    @router.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    app.endpoints = frozenset(getattr(route, "path", "") for route in router.routes)
    app.add_middleware(BodySizeLimit)
    return app
