"""The caller's SPIFFE ID in ASGI apps, and a policy middleware.

The caller is named by the client certificate of the TLS handshake, carried
in the ASGI TLS extension (``scope["extensions"]["tls"]["client_cert_chain"]``).
uvicorn does not fill that extension; run it with :class:`TLSIdentityProtocol`,
which does::

    config = uvicorn.Config(app, host="0.0.0.0", port=8443, http=TLSIdentityProtocol)
    config.load()
    config.ssl = mtls_server_context(source, authorize_member_of("example.org"))
    await uvicorn.Server(config).serve()

Then, in any ASGI app, :func:`caller_spiffe_id` reads the ID back, and
:class:`PolicyMiddleware` answers 401 (no SVID) or 403 (refused by the policy,
with the reason) before the app sees the request::

    app = PolicyMiddleware(app, Policy.load("policy.toml"))

With :mod:`sdk.tls`'s server context the peer has already been verified and
authorized during the handshake; the policy here narrows by method and path.
"""

from __future__ import annotations

import json

from spiffe import SpiffeId
from starlette.types import ASGIApp, Receive, Scope, Send

from ca.api.tls import TLSIdentityProtocol
from sdk.authorize import authorize_policy
from sdk.errors import AuthenticationError, SdkError
from sdk.peer import spiffe_id_from_pem
from sdk.policy import Policy

__all__ = ["PolicyMiddleware", "TLSIdentityProtocol", "authorize_request", "caller_spiffe_id"]


def caller_spiffe_id(scope: Scope) -> SpiffeId:
    """The SPIFFE ID of the client certificate; AuthenticationError without one."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        raise AuthenticationError(
            "no client certificate was presented; call over mTLS with an X509-SVID"
        )
    return spiffe_id_from_pem(chain[0])


def authorize_request(policy: Policy, scope: Scope) -> SpiffeId:
    """The caller's ID if ``policy`` allows it this method and path; raises SdkError otherwise."""
    peer_id = caller_spiffe_id(scope)
    authorize_policy(policy, method=scope.get("method"), path=scope.get("path"))(peer_id)
    return peer_id


class PolicyMiddleware:
    """Refuses HTTP requests the policy does not allow: 401 without an SVID, 403 with the reason."""

    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                authorize_request(self.policy, scope)
            except SdkError as err:
                await _refuse(send, err)
                return
        await self.app(scope, receive, send)


async def _refuse(send: Send, error: SdkError) -> None:
    body = json.dumps({"detail": error.message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
