"""The admin API's mesh configuration endpoints (``tessera mesh apply | get | delete``).

    POST   /v1/mesh/apply?dry_run=false&source=NAME   body: the YAML text (at most 4 MiB)
    GET    /v1/mesh                                  every resource, and the mesh revision
    GET    /v1/mesh/{kind}                           the resources of one kind
    GET    /v1/mesh/{kind}/{name}                    one resource
    DELETE /v1/mesh/{kind}/{name}                    refused while something refers to it
    GET    /v1/mesh/services?service=NAME            the catalog: every instance, its health
    GET    /v1/mesh/describe/{service}               what each proxy of a Service does, and
                                                     what its Envoys refused (``rejections``)
    POST   /v1/mesh/explain                          how one request is routed and judged

``describe`` and ``explain`` compile the stored configuration with the catalog of
instances (:mod:`mesh.compile`); each line names the resource and field it came from.
``describe`` adds the NACKs still standing of the Service's sidecars and of the gateways
routing to it, as their agents reported them (:mod:`ca.proxy_rejections`).

The compiler, ``describe``, ``explain`` and the YAML parser are imported by the
endpoints that use them, on their first call: the server starts without them.

``kind`` is a kind's name in any case (``virtualservice``). A configuration that cannot
be applied is answered 400 with every problem in ``error.field_errors``
(:mod:`ca.api.errors`), and nothing is stored. Each change wakes the agents' long
polls, which then fetch it (``GET /v1/agent/mesh`` on the node API).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from fastapi import APIRouter, Query, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ca.api.errors import RequestBody, error_responses
from ca.datastore.interface import Datastore
from ca.datastore.records import MeshApplyResult, MeshResource
from ca.proxy_rejections import ProxyRejections
from mesh import KINDS, MAX_INPUT_BYTES, Resource, kind_named
from mesh.catalog import Catalog
from mesh.errors import UnknownServiceError
from mesh.resources import Service
from sdk.clock import SYSTEM_CLOCK
from sdk.errors import InvalidArgument
from sdk.spiffeid import parse_spiffe_id

__all__ = ["APPLY_PATH", "BODY_LIMITS", "mesh_resource_json", "mesh_router"]

APPLY_PATH: Final = "/v1/mesh/apply"
BODY_LIMITS: Final = {APPLY_PATH: MAX_INPUT_BYTES}
"""For :class:`~ca.api.errors.BodySizeLimit`: the apply's body (the YAML) may be up to
:data:`mesh.MAX_INPUT_BYTES`, not the admin API's 1 MiB."""

_APPLY_BODY: Final = {
    "requestBody": {
        "required": True,
        "description": "Resources as multi-document YAML (at most 4 MiB and 1,000 documents)",
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "text/plain": {"schema": {"type": "string"}},
        },
    }
}


def mesh_resource_json(resource: MeshResource) -> dict[str, Any]:
    return {
        "kind": resource.kind,
        "name": resource.name,
        "revision": resource.revision,
        "created_at": int(resource.created_at.timestamp()),
        "updated_at": int(resource.updated_at.timestamp()),
        "document": resource.document,
    }


def apply_json(result: MeshApplyResult) -> dict[str, Any]:
    return {
        "revision": result.revision,
        "dry_run": result.dry_run,
        "changes": [
            {"kind": c.kind, "name": c.name, "action": c.action} for c in result.changes
        ],
    }


class ExplainRequest(RequestBody):
    """One request to explain: from a caller's sidecar to a Service (``from``, ``to``),
    or entering a gateway with ``gateway`` labels on ``port`` for ``host`` (``from``: the
    gateway's own SPIFFE ID, the caller the destination judges)."""

    caller: str | None = Field(None, min_length=1, max_length=2048, alias="from")
    to: str | None = Field(None, min_length=1, max_length=253)
    gateway: dict[str, str] | None = Field(None, min_length=1, max_length=64)
    host: str = Field("", max_length=253)
    method: str = Field("GET", min_length=1, max_length=32)
    path: str = Field("/", min_length=1, max_length=8192)
    headers: dict[str, str] = Field(default_factory=dict, max_length=64)
    port: int | None = Field(None, ge=1, le=65535)


def mesh_router(
    *,
    store: Datastore,
    changed: Callable[[], None],
    catalog: Callable[[], Catalog] | None = None,
    rejections: ProxyRejections | None = None,
) -> APIRouter:
    """The mesh endpoints; ``changed`` is called after each change (it wakes agents),
    ``catalog`` gives the instances ``describe`` and ``explain`` route to (the store's
    catalog unless told otherwise), ``rejections`` the NACKs agents reported."""
    router = APIRouter(prefix="/v1/mesh")
    catalog = catalog or store.mesh_catalog
    rejected = rejections if rejections is not None else ProxyRejections(SYSTEM_CLOCK)

    # Before /{kind}, which would read "services" as a kind.
    @router.get("/services")
    def services(service: str | None = Query(None, max_length=63)) -> dict[str, Any]:
        """Every registered instance (of ``service``), by Service then address."""
        found = catalog()
        instances = found.instances(service) if service is not None else tuple(found)
        return {
            "revision": store.mesh_revision(),
            "instances": [instance.to_json() for instance in instances],
        }

    # Before /{kind}/{name}, which would read "describe" as a kind.
    @router.get("/describe/{service}", responses=error_responses(404))
    def describe_service(service: str) -> dict[str, Any]:
        """What every proxy of ``service`` does, each line naming its source."""
        from mesh.describe import describe

        config, revision = store.mesh_config()
        instances = catalog()
        description = describe(config, instances, service)
        refused = rejected.of_service(config, instances, service)
        return {"revision": revision, "lines": description.lines(), **description.to_json(),
                "rejections": [rejection.to_json() for rejection in refused]}

    @router.post("/explain", responses=error_responses(400, 404))
    def explain_request(body: ExplainRequest) -> dict[str, Any]:
        """The route a request takes, its destination, and the rule that allows or
        refuses it."""
        from mesh.explain import explain, explain_gateway

        if body.gateway is not None:
            if body.to is not None:
                raise InvalidArgument("explain either a gateway's request (gateway, and from: "
                                      "the gateway's SPIFFE ID) or a call between services "
                                      "(from and to), not both")  # fmt: skip
            gateway_id = parse_spiffe_id(body.caller) if body.caller is not None else None
            config, revision = store.mesh_config()
            explanation = explain_gateway(config, catalog(), labels=body.gateway,
                                          port=body.port or 80, host=body.host,
                                          method=body.method, path=body.path,
                                          headers=body.headers,
                                          spiffe_id=gateway_id)  # fmt: skip
        else:
            if body.caller is None or body.to is None:
                raise InvalidArgument("explain needs from and to (a caller's SPIFFE ID and "
                                      "a Service), or gateway (a gateway's labels)")
            caller = parse_spiffe_id(body.caller)  # a caller is a SPIFFE ID: 400 otherwise
            config, revision = store.mesh_config()
            explanation = explain(config, catalog(), caller=caller, service=body.to,
                                  method=body.method, path=body.path, headers=body.headers,
                                  port=body.port)  # fmt: skip
            if explanation.outcome == "unknown-service":
                raise UnknownServiceError(body.to, (s.name for s in config.of_kind(Service)))
        return {"revision": revision, "lines": explanation.lines(), **explanation.to_json()}

    @router.post("/apply", responses=error_responses(400, 412), openapi_extra=_APPLY_BODY)
    async def apply(
        request: Request,
        dry_run: bool = False,
        source: str = Query("<stdin>", min_length=1, max_length=1024),
    ) -> dict[str, Any]:
        """Create or replace the resources of the YAML body, all or none: every problem
        of the input and of the configuration it would leave is answered at once."""
        body = await request.body()  # BodySizeLimit stops it at MAX_INPUT_BYTES
        return await run_in_threadpool(_apply, body, dry_run, source)

    def _apply(body: bytes, dry_run: bool, source: str) -> dict[str, Any]:
        from mesh.parse import parse_documents

        resources = parse_documents(body, source=source)
        if not resources:
            raise InvalidArgument(f"{source} holds no resources: nothing to apply")
        result = store.apply_mesh(
            resources, dry_run=dry_run, audited_by=None if dry_run else "admin"
        )
        if result.changed and not dry_run:
            changed()
        return apply_json(result)

    @router.get("")
    def list_all() -> dict[str, Any]:
        """Every resource, by kind then name, and the mesh revision they are at."""
        everything = store.mesh_changed_since(0)
        return {
            "revision": everything.revision,
            "resources": [mesh_resource_json(r) for r in _ordered(everything.resources)],
        }

    @router.get("/{kind}")
    def list_kind(kind: str) -> dict[str, Any]:
        model = _kind(kind)
        everything = store.mesh_changed_since(0)
        of_kind = [r for r in everything.resources if r.kind == model.KIND]
        return {
            "revision": everything.revision,
            "resources": [mesh_resource_json(r) for r in _ordered(of_kind)],
        }

    @router.get("/{kind}/{name}", responses=error_responses(404))
    def get_one(kind: str, name: str) -> dict[str, Any]:
        return mesh_resource_json(store.get_mesh_resource(_kind(kind).KIND, name))

    @router.delete("/{kind}/{name}", responses=error_responses(404, 412))
    def delete_one(kind: str, name: str) -> dict[str, Any]:
        """Delete a resource; refused, naming each referrer, while something refers to it."""
        tombstone = store.delete_mesh_resource(_kind(kind).KIND, name, audited_by="admin")
        changed()
        return {
            "kind": tombstone.kind,
            "name": tombstone.name,
            "revision": tombstone.revision,
            "deleted": True,
        }

    return router


def _kind(text: str) -> type[Resource]:
    model = kind_named(text)
    if model is None:
        raise InvalidArgument(
            f"{text!r} is not a mesh kind; use one of {', '.join(k.lower() for k in KINDS)}"
        )
    return model


_ORDER = {kind: position for position, kind in enumerate(KINDS)}


def _ordered(resources: Iterable[MeshResource]) -> list[MeshResource]:
    return sorted(resources, key=lambda r: (_ORDER.get(r.kind, len(KINDS)), r.name))

