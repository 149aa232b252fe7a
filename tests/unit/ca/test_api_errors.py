"""The error boundary of the HTTP APIs and the request-size guard, on a tiny FastAPI app.

Requests go through httpx's own ASGI transport (``starlette.testclient`` warns
about plain httpx, and warnings are errors here); it streams a chunked body to
the app chunk by chunk, as a real server does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from ca.api.errors import BodySizeLimit, install_error_handlers
from sdk.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TesseraError,
    Unauthenticated,
    Unavailable,
)

LIMIT = 64
TOO_LARGE = {
    "error": {
        "code": "too_large",
        "message": f"request body is larger than {LIMIT} bytes; send less at a time",
    }
}


class Echo(BaseModel):
    name: str
    count: int


def make_app() -> BodySizeLimit:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{kind}")
    async def raise_error(kind: str) -> None:
        errors: dict[str, TesseraError] = {
            cls.__name__: cls(f"{cls.__name__} happened; do the thing")
            for cls in (
                ConfigError, InvalidArgument, NotFound, AlreadyExists, PermissionDenied,
                Unauthenticated, FailedPrecondition, Unavailable, TesseraError,
            )
        }
        raise errors[kind]

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("password=hunter2 in /srv/secret.py line 7")

    @app.post("/echo")
    async def echo(body: Echo) -> dict[str, Any]:
        return body.model_dump()

    return BodySizeLimit(app, limit=LIMIT)


def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://tessera") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("ConfigError", 400, "invalid_argument"),
        ("InvalidArgument", 400, "invalid_argument"),
        ("Unauthenticated", 401, "unauthenticated"),
        ("PermissionDenied", 403, "permission_denied"),
        ("NotFound", 404, "not_found"),
        ("AlreadyExists", 409, "already_exists"),
        ("FailedPrecondition", 412, "failed_precondition"),
        ("Unavailable", 503, "unavailable"),
        ("TesseraError", 500, "internal"),
    ],
)
def test_tessera_errors_become_their_status_and_message(kind, status, code):
    response = call("GET", f"/raise/{kind}")

    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {"code": code, "message": f"{kind} happened; do the thing"}}


def test_a_validation_error_is_a_400_naming_the_fields():
    response = call("POST", "/echo", json={"name": "web", "count": "many"})

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid_argument",
            "message": "invalid request: count: Input should be a valid integer, "
            "unable to parse string as an integer",
        }
    }


def test_a_body_that_is_not_json_is_a_400():
    response = call(
        "POST", "/echo", content=b"{not json", headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    body = response.json()["error"]
    assert body["code"] == "invalid_argument"
    assert body["message"].startswith("invalid request: ")


def test_a_missing_body_is_a_400_that_says_so():
    response = call("POST", "/echo")

    assert response.status_code == 400
    assert response.json()["error"]["message"] == "invalid request: request body: Field required"


def test_an_unexpected_exception_is_a_bare_500(caplog):
    with caplog.at_level(logging.ERROR, logger="ca.api.errors"):
        response = call("GET", "/crash")

    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal", "message": "internal server error"}}
    assert "hunter2" not in response.text
    assert "Traceback" not in response.text
    assert any(record.exc_info for record in caplog.records)  # the log keeps the detail


def test_a_body_within_the_limit_passes():
    response = call("POST", "/echo", json={"name": "web", "count": 1})

    assert response.status_code == 200
    assert response.json() == {"name": "web", "count": 1}


def test_a_body_over_the_limit_by_content_length_is_a_413():
    body = json.dumps({"name": "x" * LIMIT, "count": 1}).encode()

    response = call("POST", "/echo", content=body, headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert response.json() == TOO_LARGE


def test_a_chunked_body_over_the_limit_is_a_413():
    chunks_sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        for _ in range(10):
            chunks_sent += 1
            yield b"x" * 16

    response = call(
        "POST", "/echo", content=chunks(), headers={"content-type": "application/json"}
    )

    assert response.status_code == 413
    assert response.json() == TOO_LARGE
    assert chunks_sent < 10  # refused as soon as the limit was passed, not after reading it all


def test_the_limit_counts_the_body_not_the_header_alone():
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "web",'
        yield b' "count": 2}'

    response = call("POST", "/echo", content=chunks(), headers={"content-type": "application/json"})

    assert response.status_code == 200
    assert response.json() == {"name": "web", "count": 2}


def test_an_unknown_path_answers_in_the_same_shape():
    response = call("GET", "/no/such/path")

    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "Not Found"}}


def test_a_wrong_method_answers_in_the_same_shape():
    response = call("DELETE", "/echo")

    assert response.status_code == 405
    assert response.json() == {
        "error": {"code": "method_not_allowed", "message": "Method Not Allowed"}
    }
    assert response.headers["allow"] == "POST"


def test_an_unknown_field_in_an_admin_request_is_refused_not_dropped(tmp_path) -> None:
    """A typo such as x509_svid_tll used to be dropped silently (201, default TTL)."""
    from ca.config import server_config
    from ca.server import Server

    server = Server(server_config({"trust_domain": "example.org", "bind": "127.0.0.1:0",
                                   "data_dir": str(tmp_path / "server")}))
    try:
        _, admin = server._apps()

        async def post() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=admin),
                                         base_url="http://tessera") as client:
                return await client.post("/v1/entries", json={
                    "parent_id": "spiffe://example.org/node",
                    "spiffe_id": "spiffe://example.org/web",
                    "selectors": ["unix:uid:1"], "x509_svid_tll": 60,
                })

        answer = asyncio.run(post())
        assert answer.status_code == 400
        assert answer.json() == {"error": {
            "code": "invalid_argument",
            "message": "invalid request: x509_svid_tll: not a field of this request (a typo?)",
        }}
        assert server.store.count_entries() == 0
    finally:
        server.store.close()
