"""FastAPI dependencies: who is calling, may they, and JWT-SVID bearer tokens.

::

    from sdk.integrations.fastapi import enforce_policy, jwt_svid_caller, spiffe_peer

    app = FastAPI(dependencies=[Depends(enforce_policy(Policy.load("policy.toml")))])

    @app.get("/items")
    def items(peer: SpiffeId = Depends(spiffe_peer)) -> list[str]:
        ...                                 # peer: the caller's SVID, from the handshake

    api_caller = jwt_svid_caller(jwt_source, audience="spiffe://example.org/api")

    @app.get("/reports")
    def reports(caller: SpiffeId = Depends(api_caller)) -> list[str]:
        ...                                 # caller: the JWT-SVID's subject

``spiffe_peer`` and ``enforce_policy`` read the client certificate from the
ASGI TLS extension; serve with :class:`sdk.integrations.asgi.TLSIdentityProtocol`.
Refusals are ``HTTPException``: 401 when the caller proved no SPIFFE ID,
403 when the policy refused it, the reason in ``detail``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request

from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.errors import AuthenticationError, SdkError
from sdk.integrations.asgi import authorize_request, caller_spiffe_id
from sdk.jwtsvid import validate_jwt_svid
from sdk.policy import Policy
from sdk.sources import JwtBundleSource
from sdk.spiffeid import SpiffeId

__all__ = ["enforce_policy", "jwt_svid_caller", "spiffe_peer"]


async def spiffe_peer(request: Request) -> SpiffeId:
    """The SPIFFE ID of the caller's X509-SVID; 401 without one."""
    try:
        return caller_spiffe_id(request.scope)
    except SdkError as err:
        raise _http_error(err) from err


def enforce_policy(policy: Policy) -> Callable[[Request], Awaitable[SpiffeId]]:
    """A dependency allowing the request only if ``policy`` allows its caller, method and path."""

    async def enforce(request: Request) -> SpiffeId:
        try:
            return authorize_request(policy, request.scope)
        except SdkError as err:
            raise _http_error(err) from err

    return enforce


def jwt_svid_caller(
    bundle_source: JwtBundleSource, audience: str, *, clock: Clock = SYSTEM_CLOCK
) -> Callable[[Request], Awaitable[SpiffeId]]:
    """A dependency validating ``Authorization: Bearer <JWT-SVID>`` for ``audience``.

    ``bundle_source`` is a JWT source (``WorkloadApiJwtSource``) or anything
    with ``jwt_bundle_for``. Returns the token's SPIFFE ID; 401 with the
    reason when the token is missing, expired (by ``clock``), for another
    audience or not signed by its trust domain.
    """

    async def caller(request: Request) -> SpiffeId:
        try:
            token = _bearer_token(request)
            return validate_jwt_svid(token, bundle_source, audience, clock=clock).spiffe_id
        except SdkError as err:
            raise _http_error(err, bearer=True) from err

    return caller


def _bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise AuthenticationError(
            "no JWT-SVID was presented; send Authorization: Bearer <JWT-SVID>"
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "the Authorization header is not a bearer token; send Authorization: Bearer <JWT-SVID>"
        )
    return token.strip()


def _http_error(error: SdkError, *, bearer: bool = False) -> HTTPException:
    headers = {"WWW-Authenticate": "Bearer"} if bearer and error.status == 401 else None
    return HTTPException(status_code=error.status, detail=error.message, headers=headers)
