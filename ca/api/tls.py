"""The one place where a TLS peer's certificate becomes the caller's identity.

uvicorn does not fill the ASGI TLS extension, so :class:`TLSIdentityProtocol`
does it: when a connection is made it reads the peer's certificate from the
TLS object (already verified by the handshake against the trust bundle) and
wraps the app so that every request on that connection carries
``scope["extensions"]["tls"]["client_cert_chain"]``. Nothing else — no header,
no query parameter — can name the caller. :func:`peer_spiffe_id` reads it back.
Every listener of the server (node API, bundle endpoint, admin socket) speaks
this protocol, and it is also where a connection's limits hold (see
:mod:`ca.api.limits`): it asks the listener's guard for a place when the
connection is made, and closes a connection that has not sent a whole request
within ``request_timeout``.

:class:`RotatingServerContext` gives uvicorn one ``SSLContext`` whose
``sni_callback`` swaps in a fresh context per handshake whenever the bundle or
the server's own SVID has changed, so trust anchors follow CA rotation
without a restart.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from sdk.errors import Unauthenticated
from sdk.keys import PrivateKey
from sdk.tls_material import load_identity

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from ca.api.limits import ConnectionGuard
    from ca.config import ConnectionLimits

REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 42\r\nconnection: close\r\n\r\n"
    b"the request did not arrive whole in time\r\n"
)


def _with_peer_certificate(app: ASGIApp, chain: list[str]) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = dict(scope)
            extensions = dict(scope.get("extensions") or {})
            extensions["tls"] = {"client_cert_chain": chain}
            scope["extensions"] = extensions
        await app(scope, receive, send)

    return wrapped


class TLSIdentityProtocol(H11Protocol):
    """uvicorn's h11 protocol, filling the ASGI TLS extension from the handshake and
    holding each connection to its listener's limits (with ``guard`` and ``limits``)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard | None = None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._guard = guard
        self._request_timeout = limits.request_timeout.total_seconds() if limits else None
        # Made when the connection is accepted, before any TLS handshake: the first
        # request's time runs from here.
        self._accepted_at = self.loop.time()
        self._peer: str | None = None
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        from ca.api.limits import peer_address

        if self._guard is not None:
            self._peer = peer_address(transport)
            if not self._guard.admit(self._peer):
                transport.abort()  # no TLS close_notify exchange to wait for
                return
        self._admitted = True
        super().connection_made(transport)
        chain: list[str] = []
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                chain = [ssl.DER_cert_to_PEM_cert(der)]
        self.app = _with_peer_certificate(self.app, chain)
        if self._request_timeout is not None:
            self._arm(self._accepted_at + self._request_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return  # refused in connection_made: nothing was set up
        self._admitted = False
        self._disarm()
        if self._guard is not None:
            self._guard.release(self._peer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request()

    # -- the request deadline -----------------------------------------------------------

    def _request_pending(self) -> bool:
        """A request has begun and not yet arrived whole."""
        state = self.conn.their_state
        return state is h11.SEND_BODY or (state is h11.IDLE and bool(self.conn.trailing_data[0]))

    def _follow_request(self) -> None:
        if self._request_timeout is None or not self._admitted:
            return
        if self._request_pending():
            if self._deadline is None:
                self._arm(self.loop.time() + self._request_timeout)
        elif self.conn.their_state is not h11.IDLE:
            self._disarm()  # the request is whole; the app's time is not bounded here
        elif self.cycle is not None:
            self._disarm()  # between requests: uvicorn's keep-alive timeout holds

    def _arm(self, when: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_at(when, self._request_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._guard is not None:
            self._guard.timed_out()
        if self.conn.their_state is h11.SEND_BODY and self.cycle is not None:
            self.cycle.disconnected = True  # the app stops waiting for a body that never came
        elif self.conn.our_state is h11.IDLE and self._request_pending():
            self.transport.write(REQUEST_TIMEOUT_RESPONSE)  # a head had begun
        # abort, not close: a TLS close would wait for the slow peer's close_notify
        self.transport.abort()


def peer_certificate(scope: Scope) -> x509.Certificate | None:
    chain = (scope.get("extensions") or {}).get("tls", {}).get("client_cert_chain") or []
    if not chain:
        return None
    return x509.load_pem_x509_certificate(chain[0].encode())


def peer_spiffe_id(scope: Scope) -> tuple[SpiffeId, x509.Certificate]:
    """The SPIFFE ID of the verified client certificate; Unauthenticated without one."""
    cert = peer_certificate(scope)
    if cert is None:
        raise Unauthenticated(
            "no client certificate was presented; agents must call with their SVID"
        )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise Unauthenticated("the client certificate is not an X509-SVID (needs one URI SAN)")
    try:
        return SpiffeId(uris[0]), cert
    except Exception as err:
        raise Unauthenticated("the client certificate's URI SAN is not a SPIFFE ID") from err


@dataclass(frozen=True)
class ServerIdentity:
    """What the server presents in TLS: its SVID chain, key and the trust anchors."""

    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey
    trust_anchors: tuple[x509.Certificate, ...]
    version: tuple[Any, ...]


class RotatingServerContext:
    """An SSLContext for uvicorn that re-reads identity and trust per handshake."""

    def __init__(self, identity: Callable[[], ServerIdentity], *, require_client: bool) -> None:
        self._identity = identity
        self._require_client = require_client
        self._version: tuple[Any, ...] | None = None
        self._current: ssl.SSLContext | None = None
        self.context = self._build(identity())
        self.context.sni_callback = self._select

    def current(self) -> ssl.SSLContext:
        identity = self._identity()
        if identity.version != self._version or self._current is None:
            self._current = self._build(identity)
            self._version = identity.version
        return self._current

    def _select(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        sock.context = self.current()

    def _build(self, identity: ServerIdentity) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED if self._require_client else ssl.CERT_OPTIONAL
        anchors = "".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in identity.trust_anchors
        )
        context.load_verify_locations(cadata=anchors)
        load_identity(context, identity.chain, identity.private_key)
        self._version = identity.version
        self._current = context
        return context
