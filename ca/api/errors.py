"""One boundary where errors become HTTP responses, and the request-size guard.

Every error a handler raises on purpose is a :class:`sdk.errors.TesseraError`
and carries its status and a message safe for the caller. Validation errors
become 400s that say which field is wrong. Anything else is logged with its
traceback and answered with a bare 500 that leaks nothing. Every refusal has
one shape, :class:`ErrorResponse`::

    {"error": {"code": "not_found", "message": "registration entry 7 not found; ..."}}

A mesh configuration that cannot be applied (:class:`mesh.ConfigError`) adds every
problem, one object each, as ``field_errors``::

    {"error": {"code": "invalid_argument", "message": "<one line per problem>",
               "field_errors": [{"kind": "VirtualService", "name": "reviews",
                                 "path": "spec.http[0].route[0].weight",
                                 "message": "...", "source": "mesh.yaml", "document": 2}]}}

The OpenAPI schema says so: a route names the refusals it can answer with
``responses=error_responses(404, 409)``, and :func:`install_error_handlers`
makes the schema document, on every operation, the 400 that validation gives
(in place of FastAPI's 422, which these APIs never answer) and, on every
operation with a body, the 413 of :class:`BodySizeLimit`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mesh import ConfigError as MeshConfigError
from mesh import FieldError
from sdk.errors import TesseraError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024

_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "already_exists",
    412: "failed_precondition",
    413: "too_large",
    503: "unavailable",
}


ErrorCode = Literal[
    "invalid_argument", "unauthenticated", "permission_denied", "not_found",
    "method_not_allowed", "already_exists", "failed_precondition", "too_large", "unavailable",
    "internal", "agent_banned",
]

_DESCRIPTIONS = {
    400: "Invalid request: a field, parameter or value is wrong (the message names it)",
    401: "The caller did not prove who it is",
    403: "The caller may not do this",
    404: "The named thing does not exist",
    409: "It exists already",
    412: "The state does not allow it now",
    413: f"The request body is larger than {MAX_BODY_BYTES} bytes (the mesh configuration's "
    "apply: 4 MiB)",
    503: "A dependency (the datastore) is not answering",
}


class RequestBody(BaseModel):
    """A request body of the admin API: a field it does not know (a typo such as
    ``x509_svid_tll``) is refused with 400, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class FieldErrorDetail(BaseModel):
    """One problem of a mesh configuration: the resource, the path of the field in it
    and what is wrong. ``kind`` and ``name`` are empty where the document did not get
    that far; then ``source`` and ``document`` (from 1) say where it is."""

    kind: str
    name: str
    path: str
    message: str
    source: str = ""
    document: int = 0


class ErrorDetail(BaseModel):
    code: ErrorCode
    message: str
    field_errors: list[FieldErrorDetail] | None = None


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code or _CODES.get(status, "internal"), "message": message}}


def field_error_json(error: FieldError) -> dict[str, Any]:
    return {
        "kind": error.kind,
        "name": error.name,
        "path": error.path,
        "message": error.message,
        "source": error.source,
        "document": error.document,
    }


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that may refuse with these statuses."""
    return {
        status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        for status in statuses
    }


def install_error_handlers(app: FastAPI) -> None:
    _document_errors(app)

    @app.exception_handler(TesseraError)
    async def _tessera_error(request: Request, exc: TesseraError) -> JSONResponse:
        return tessera_error_response(request.method, request.url.path, exc)

    @app.exception_handler(MeshConfigError)
    async def _mesh_config_error(request: Request, exc: MeshConfigError) -> JSONResponse:
        body = error_body(exc.status, exc.message, exc.code)
        body["error"]["field_errors"] = [field_error_json(e) for e in exc.errors]
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing's own refusals (unknown path, wrong method) in the same shape as ours.
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, describe_validation(exc)), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error_response(request.method, request.url.path)


def tessera_error_response(method: str, path: str, exc: TesseraError) -> JSONResponse:
    """The answer to a refusal of ours (logged when it is the server's fault)."""
    if exc.status >= 500:
        log.warning("%s %s: %s", method, path, exc.message)
    return JSONResponse(error_body(exc.status, exc.message, exc.code), status_code=exc.status)


def unexpected_error_response(method: str, path: str) -> JSONResponse:
    """The answer to any other error, logged with its traceback (call it in ``except``)."""
    log.exception("unexpected error in %s %s", method, path)
    return JSONResponse(error_body(500, "internal server error"), status_code=500)


def _document_errors(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe the refusals the handlers above really give."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        reference = {"$ref": "#/components/schemas/ErrorResponse"}

        def refusal(status: int) -> dict[str, Any]:
            return {
                "description": _DESCRIPTIONS[status],
                "content": {"application/json": {"schema": reference}},
            }

        for item in schema.get("paths", {}).values():
            for operation in item.values():
                responses = operation["responses"]
                # FastAPI adds 422 exactly where it validates something; we answer that with 400.
                if responses.pop("422", None) is not None:
                    responses.setdefault("400", refusal(400))
                if "requestBody" in operation:
                    responses.setdefault("413", refusal(413))
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        model = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in model.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components.setdefault("ErrorResponse", model)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def describe_validation(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = error.get("msg", "invalid")
        if error.get("type") == "extra_forbidden":
            message = "not a field of this request (a typo?)"
        problems.append(f"{where or 'request body'}: {message}")
    return "invalid request: " + "; ".join(problems)


class BodySizeLimit:
    """Refuse request bodies over ``limit`` bytes with 413 before reading them whole;
    ``paths`` gives some paths a limit of their own (the mesh configuration's apply
    takes up to :data:`mesh.MAX_INPUT_BYTES`)."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int = MAX_BODY_BYTES,
        paths: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.paths = dict(paths or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope.get("path", ""), self.limit)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(send, limit)
                return
        received = 0
        started = False
        refused = False

        async def limited_receive() -> Message:
            # Raising here would not reach us: FastAPI turns any error while it reads a
            # body into its own 400. So answer 413 now and tell the app the client left.
            nonlocal received, started, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        started = True
                        await _too_large(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the answer; drop whatever the app says after it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)


async def _too_large(send: Send, limit: int) -> None:
    import json

    body = json.dumps(
        error_body(413, f"request body is larger than {limit} bytes; send less at a time")
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})
