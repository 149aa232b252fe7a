"""httpx clients against a real uvicorn + FastAPI app over mTLS, and JWT-SVID bearer tokens."""

import asyncio
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
import jwt
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Depends, FastAPI, Request
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain

from sdk.authorize import authorize_any, authorize_id, authorize_member_of
from sdk.clock import ManualClock
from sdk.integrations.asgi import PolicyMiddleware, TLSIdentityProtocol, caller_spiffe_id
from sdk.integrations.fastapi import enforce_policy, jwt_svid_caller, spiffe_peer
from sdk.integrations.httpx import async_httpx_client, bearer_auth, httpx_client
from sdk.policy import Policy
from sdk.sources import StaticX509Source, WorkloadApiJwtSource
from sdk.tls import mtls_server_context
from tests.unit.sdk.conftest import (
    API_ID,
    DEADLINE_SECONDS,
    JWT_KID,
    TRUST_DOMAIN,
    WEB_ID,
    LoopThread,
    RunningWorkloadApi,
    TestCA,
)

AUDIENCE = "spiffe://example.org/api"

POLICY = Policy.from_dict(
    {
        "allow": [
            {"name": "web-reads", "ids": [WEB_ID], "methods": ["GET"], "paths": ["/api"]},
        ],
        "deny": [{"name": "no-legacy", "ids": ["spiffe://example.org/legacy"]}],
    },
    source="test-policy",
)


class JwtBundles:
    """A JwtBundleSource that asks the live Workload API source, set once the app exists."""

    source: WorkloadApiJwtSource | None = None

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JwtBundle | None:
        assert self.source is not None
        return self.source.jwt_bundle_for(trust_domain)


def make_app(jwt_bundles: JwtBundles) -> FastAPI:
    app = FastAPI()

    @app.get("/whoami")
    async def whoami(
        request: Request, peer: Annotated[SpiffeId, Depends(spiffe_peer)]
    ) -> dict[str, Any]:
        chain = request.scope["extensions"]["tls"]["client_cert_chain"]
        serial = x509.load_pem_x509_certificate(chain[0].encode()).serial_number
        return {"peer": str(peer), "serial": serial}

    guarded = APIRouter(dependencies=[Depends(enforce_policy(POLICY))])

    @guarded.get("/api/items")
    async def items() -> list[str]:
        return ["one", "two"]

    @guarded.delete("/api/items")
    async def delete_items() -> list[str]:
        return []

    app.include_router(guarded)

    reports_caller = jwt_svid_caller(jwt_bundles, AUDIENCE)

    @app.get("/reports")
    async def reports(caller: Annotated[SpiffeId, Depends(reports_caller)]) -> str:
        return str(caller)

    return app


class RunningApp:
    """uvicorn serving an ASGI app on a loopback port over the SDK's server context."""

    def __init__(self, loop: LoopThread, app: Any, context: ssl.SSLContext) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        config = uvicorn.Config(
            app,
            http=TLSIdentityProtocol,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        config.load()
        config.ssl = context
        self.server = uvicorn.Server(config)
        self._serving = asyncio.run_coroutine_threadsafe(
            self.server.serve(sockets=[listener]), loop.loop
        )
        self._listener = listener

    def close(self) -> None:
        self.server.should_exit = True
        self._serving.result(DEADLINE_SECONDS)
        self._listener.close()


@pytest.fixture
def jwt_bundles() -> JwtBundles:
    return JwtBundles()


@pytest.fixture
def app_server(
    loop_thread: LoopThread, api_source: StaticX509Source, jwt_bundles: JwtBundles
) -> Iterator[RunningApp]:
    context = mtls_server_context(api_source, authorize_member_of(TRUST_DOMAIN))
    running = RunningApp(loop_thread, make_app(jwt_bundles), context)
    yield running
    running.close()


# -- mTLS ---------------------------------------------------------------------------------


def test_a_sync_client_reaches_the_handler_with_its_spiffe_id(
    app_server: RunningApp, web_source: StaticX509Source
) -> None:
    with httpx_client(web_source, authorize_id(API_ID), base_url=app_server.url) as client:
        answer = client.get("/whoami").json()

    assert answer == {"peer": WEB_ID, "serial": web_source.x509_svid().leaf.serial_number}


def test_an_async_client_reaches_the_handler(
    loop_thread: LoopThread, app_server: RunningApp, web_source: StaticX509Source
) -> None:
    async def call() -> Any:
        async with async_httpx_client(
            web_source, authorize_id(API_ID), base_url=app_server.url
        ) as client:
            return (await client.get("/whoami")).json()["peer"]

    assert loop_thread.run(call()) == WEB_ID


def test_the_policy_dependency_allows_and_refuses_by_method_and_path(
    app_server: RunningApp, ca: TestCA, web_source: StaticX509Source
) -> None:
    legacy = StaticX509Source(ca.issue_x509_svid("spiffe://example.org/legacy"), [ca.bundle()])
    with (
        httpx_client(web_source, authorize_id(API_ID), base_url=app_server.url) as web,
        httpx_client(legacy, authorize_id(API_ID), base_url=app_server.url) as old,
    ):
        allowed = web.get("/api/items")
        wrong_method = web.delete("/api/items")
        denied = old.get("/api/items")

    assert (allowed.status_code, allowed.json()) == (200, ["one", "two"])
    assert (wrong_method.status_code, wrong_method.json()) == (
        403,
        {
            "detail": "spiffe://example.org/web refused by policy rule 'default-deny': "
            "no allow rule matches it for DELETE /api/items"
        },
    )
    assert (denied.status_code, denied.json()) == (
        403,
        {
            "detail": "spiffe://example.org/legacy refused by policy rule 'no-legacy': "
            "denied by its ids for GET /api/items"
        },
    )


def test_the_policy_middleware(
    loop_thread: LoopThread, api_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = str(caller_spiffe_id(scope)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    context = mtls_server_context(api_source, authorize_any())
    running = RunningApp(loop_thread, PolicyMiddleware(app, POLICY), context)
    try:
        with httpx_client(web_source, authorize_id(API_ID), base_url=running.url) as client:
            allowed = client.get("/api/x")
            refused = client.post("/api/x")
    finally:
        running.close()

    assert (allowed.status_code, allowed.text) == (200, WEB_ID)
    assert (refused.status_code, refused.json()) == (
        403,
        {
            "detail": "spiffe://example.org/web refused by policy rule 'default-deny': "
            "no allow rule matches it for POST /api/x"
        },
    )


def test_a_client_the_server_refuses_in_the_handshake_gets_no_answer(
    app_server: RunningApp, partner_ca: TestCA, ca: TestCA
) -> None:
    outsider = StaticX509Source(
        partner_ca.issue_x509_svid("spiffe://partner.test/web"), [ca.bundle()]
    )

    with (
        httpx_client(outsider, authorize_id(API_ID), base_url=app_server.url) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.get("/whoami")


def test_the_client_refuses_a_server_with_another_id(
    app_server: RunningApp, web_source: StaticX509Source
) -> None:
    with (
        httpx_client(web_source, authorize_id("spiffe://example.org/db")) as client,
        pytest.raises(httpx.ConnectError) as refused,
    ):
        client.get(f"{app_server.url}/whoami")

    assert str(refused.value) == (
        "spiffe://example.org/api refused by authorize_id: expected spiffe://example.org/db"
    )


def test_the_client_dials_with_the_rotated_svid_without_being_recreated(
    app_server: RunningApp, ca: TestCA, web_source: StaticX509Source
) -> None:
    with httpx_client(web_source, authorize_id(API_ID), base_url=app_server.url) as client:
        before = client.get("/whoami").json()["serial"]
        kept_alive = client.get("/whoami").json()["serial"]
        web_source.update(svid=ca.issue_x509_svid(WEB_ID))
        after = client.get("/whoami").json()["serial"]

    assert before == kept_alive
    assert after == web_source.x509_svid().leaf.serial_number != before


def test_the_async_client_dials_with_the_rotated_svid(
    loop_thread: LoopThread, app_server: RunningApp, ca: TestCA, web_source: StaticX509Source
) -> None:
    async def calls() -> list[int]:
        serials = []
        async with async_httpx_client(
            web_source, authorize_id(API_ID), base_url=app_server.url
        ) as client:
            serials.append((await client.get("/whoami")).json()["serial"])
            web_source.update(svid=ca.issue_x509_svid(WEB_ID))
            serials.append((await client.get("/whoami")).json()["serial"])
        return serials

    before, after = loop_thread.run(calls())

    assert after == web_source.x509_svid().leaf.serial_number != before


# -- JWT-SVIDs ----------------------------------------------------------------------------


@pytest.fixture
def jwt_source(
    workload_api: RunningWorkloadApi, jwt_bundles: JwtBundles
) -> Iterator[WorkloadApiJwtSource]:
    with WorkloadApiJwtSource(workload_api.address, timeout=DEADLINE_SECONDS) as source:
        jwt_bundles.source = source
        yield source


def test_a_jwt_svid_from_the_workload_api_reaches_the_handler(
    app_server: RunningApp, web_source: StaticX509Source, jwt_source: WorkloadApiJwtSource
) -> None:
    auth = bearer_auth(jwt_source, AUDIENCE)
    with httpx_client(web_source, authorize_id(API_ID), base_url=app_server.url) as client:
        answer = client.get("/reports", auth=auth)

    assert (answer.status_code, answer.json()) == (200, WEB_ID)


@pytest.mark.parametrize(
    ("token", "detail"),
    [
        (
            lambda api: api.provider.mint_jwt(WEB_ID, [AUDIENCE], lifetime=-60),
            "the JWT-SVID has expired",
        ),
        (
            lambda api: api.provider.mint_jwt(WEB_ID, ["spiffe://example.org/other"]),
            "the JWT-SVID is for audience 'spiffe://example.org/other', "
            "not 'spiffe://example.org/api'",
        ),
        (
            lambda api: api.provider.mint_jwt("spiffe://partner.test/web", [AUDIENCE]),
            "the JWT-SVID of spiffe://partner.test/web is from trust domain partner.test, "
            "which this service has no JWT bundle for",
        ),
        (lambda api: _forged(WEB_ID), "the JWT-SVID signature is not valid"),
        (
            lambda api: "not-a-token",
            "the JWT-SVID is malformed: expected three base64url parts joined by '.'",
        ),
    ],
    ids=["expired", "other-audience", "unknown-trust-domain", "forged", "garbage"],
)
def test_a_refused_jwt_svid_gets_401_with_the_reason(
    app_server: RunningApp,
    web_source: StaticX509Source,
    workload_api: RunningWorkloadApi,
    jwt_source: WorkloadApiJwtSource,
    token: Any,
    detail: str,
) -> None:
    headers = {"Authorization": f"Bearer {token(workload_api)}"}
    with httpx_client(web_source, authorize_id(API_ID), base_url=app_server.url) as client:
        answer = client.get("/reports", headers=headers)

    assert (answer.status_code, answer.json()) == (401, {"detail": detail})
    assert answer.headers["www-authenticate"] == "Bearer"


def _forged(spiffe_id: str) -> str:
    """A token with the agent's key ID, signed by some other key."""
    now = int(time.time())
    claims = {"sub": spiffe_id, "aud": [AUDIENCE], "iat": now, "exp": now + 300}
    other_key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(claims, other_key, algorithm="ES256", headers={"kid": JWT_KID})


def test_a_request_without_a_bearer_token_gets_401(
    app_server: RunningApp, web_source: StaticX509Source, jwt_source: WorkloadApiJwtSource
) -> None:
    with httpx_client(web_source, authorize_id(API_ID), base_url=app_server.url) as client:
        missing = client.get("/reports")
        basic = client.get("/reports", auth=("user", "password"))

    assert missing.json() == {
        "detail": "no JWT-SVID was presented; send Authorization: Bearer <JWT-SVID>"
    }
    assert basic.json() == {
        "detail": "the Authorization header is not a bearer token; "
        "send Authorization: Bearer <JWT-SVID>"
    }
    assert (missing.status_code, basic.status_code) == (401, 401)


class CountingJwtSource:
    """Wraps a JwtSource and counts the JWT-SVIDs fetched."""

    def __init__(self, inner: WorkloadApiJwtSource) -> None:
        self.inner = inner
        self.fetched: list[JwtSvid] = []

    def fetch_jwt_svid(
        self, audience: str | Iterable[str], subject: SpiffeId | None = None
    ) -> JwtSvid:
        svid = self.inner.fetch_jwt_svid(audience, subject)
        self.fetched.append(svid)
        return svid

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JwtBundle | None:
        return self.inner.jwt_bundle_for(trust_domain)


def test_bearer_auth_reuses_a_token_until_half_its_life_is_gone(
    jwt_source: WorkloadApiJwtSource,
) -> None:
    counting = CountingJwtSource(jwt_source)
    first = counting.fetch_jwt_svid(AUDIENCE)  # to learn the expiry the fake agent gives
    clock = ManualClock()
    auth = bearer_auth(counting, AUDIENCE, clock=clock)
    clock.set(datetime.fromtimestamp(first.expiry - 300, UTC))  # the fake's tokens live 300 s

    tokens = [auth.token()]
    clock.advance(timedelta(seconds=149))
    tokens.append(auth.token())
    clock.advance(timedelta(seconds=2))
    tokens.append(auth.token())

    assert len(counting.fetched) == 3  # the probe, then one per half-life
    assert tokens[0] == tokens[1] == counting.fetched[1].token
    assert tokens[2] == counting.fetched[2].token
