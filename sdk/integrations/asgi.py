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

:class:`TLSIdentityProtocol` reads the peer's certificate once, when the
connection is made, from the TLS object the handshake verified, and wraps the
app so that every request on that connection carries it in place of whatever
the scope held: nothing else (no header, no query parameter) can name the
caller. Tessera's own server speaks it on every listener.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from sdk.authorize import authorize_policy
from sdk.errors import AuthenticationError, SdkError
from sdk.peer import spiffe_id_from_pem
from sdk.policy import Policy
from sdk.spiffeid import SpiffeId

__all__ = ["PolicyMiddleware", "TLSIdentityProtocol", "authorize_request", "caller_spiffe_id"]


class TLSIdentityProtocol(H11Protocol):
    """uvicorn's h11 protocol, filling the ASGI TLS extension from the connection's handshake
    (``client_cert_chain``: the peer's certificate in PEM, or empty without one)."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        chain: list[str] = []
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                chain = [ssl.DER_cert_to_PEM_cert(der)]
        self.app = _with_peer_certificate(self.app, chain)


def _with_peer_certificate(app: ASGIApp, chain: list[str]) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = dict(scope)
            extensions = dict(scope.get("extensions") or {})
            extensions["tls"] = {"client_cert_chain": chain}
            scope["extensions"] = extensions
        await app(scope, receive, send)

    return wrapped


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
