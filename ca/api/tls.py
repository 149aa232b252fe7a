"""The one place where a TLS peer's certificate becomes the caller's identity.

uvicorn does not fill the ASGI TLS extension, so :class:`TLSIdentityProtocol`
does it: when a connection is made it reads the peer's certificate from the
TLS object (already verified by the handshake against the trust bundle) and
wraps the app so that every request on that connection carries
``scope["extensions"]["tls"]["client_cert_chain"]``. Nothing else — no header,
no query parameter — can name the caller. :func:`peer_spiffe_id` reads it back.

:class:`RotatingServerContext` gives uvicorn one ``SSLContext`` whose
``sni_callback`` swaps in a fresh context per handshake whenever the bundle or
the server's own SVID has changed, so trust anchors follow CA rotation
without a restart.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from sdk.errors import Unauthenticated
from sdk.keys import PrivateKey
from sdk.tls_material import load_identity


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
    """uvicorn's h11 protocol, filling the ASGI TLS extension from the handshake."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        chain: list[str] = []
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                chain = [ssl.DER_cert_to_PEM_cert(der)]
        self.app = _with_peer_certificate(self.app, chain)


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
