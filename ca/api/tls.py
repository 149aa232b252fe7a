"""The server's TLS: the context its HTTPS listeners serve with, and the caller's identity.

:func:`server_tls_context` is the node API's context (and the bundle
endpoint's, with profile ``https_spiffe``), built by :func:`sdk.tls.server_context`.
It presents the server's own SVID and trusts the trust domain's bundle, both
asked of ``identity()`` before each handshake; when their version moved, the
next handshake uses a context built from the new ones, so the SVID's renewal
and the trust anchors follow CA rotation without a restart. A client may come
without a certificate (an agent that has yet to attest); a certificate it
presents must be an X509-SVID of this trust domain, or the handshake fails::

    tls = server_tls_context(server.server_identity)

The handshake's client certificate reaches the app in the ASGI TLS extension,
which :class:`sdk.integrations.asgi.TLSIdentityProtocol` fills (every listener
speaks it, held to its limits by :class:`ca.api.limits.LimitedProtocol`);
nothing else — no header, no query parameter — can name the caller.
:func:`peer_spiffe_id` reads it back.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography import x509
from starlette.types import Scope

from sdk.authorize import authorize_any
from sdk.bundle import TrustBundle
from sdk.errors import NotAnX509Svid, Unauthenticated
from sdk.keys import PrivateKey
from sdk.peer import spiffe_id_from_certificate
from sdk.spiffeid import SpiffeId
from sdk.tls import TlsMaterial, server_context


@dataclass(frozen=True)
class ServerIdentity:
    """What the server presents in TLS: its SVID chain and key, and its trust domain's bundle
    (whose X.509 authorities it trusts)."""

    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey
    bundle: TrustBundle
    version: tuple[Any, ...]
    """Changes whenever the chain or the bundle does."""


def server_tls_context(identity: Callable[[], ServerIdentity]) -> ssl.SSLContext:
    """The context presenting ``identity()``'s SVID, rebuilt when its version moves; clients
    present an X509-SVID of its bundle's trust domain, or no certificate."""

    def material() -> TlsMaterial:
        current = identity()
        return TlsMaterial(current.chain, current.private_key, [current.bundle])

    # The bundle is the server's own trust domain's alone, so any SVID that chains to it
    # is of that trust domain; what the caller may do is the node API's to judge.
    return server_context(
        material,
        version=lambda: identity().version,
        authorizer=authorize_any(),
        client_certificate="optional",
    )


PEER_CACHE_SIZE = 4096
"""Client certificates whose parse is kept: one per connected agent, more than a node API
holds busy at once; an agent beyond them is parsed again, nothing else changes."""


def peer_certificate(scope: Scope) -> x509.Certificate | None:
    chain = (scope.get("extensions") or {}).get("tls", {}).get("client_cert_chain") or []
    if not chain:
        return None
    return x509.load_pem_x509_certificate(chain[0].encode())


def peer_spiffe_id(scope: Scope) -> tuple[SpiffeId, x509.Certificate]:
    """The SPIFFE ID of the verified client certificate; Unauthenticated without one.

    Every request of a connection carries the same certificate (the same string:
    :class:`ca.api.limits.LimitedProtocol` reads it once, at the handshake), so it is
    parsed once, not per request: the answer is kept by the certificate's PEM.
    """
    chain = (scope.get("extensions") or {}).get("tls", {}).get("client_cert_chain") or []
    if not chain:
        raise Unauthenticated(
            "no client certificate was presented; agents must call with their SVID"
        )
    identity = _identity(chain[0])
    if isinstance(identity, str):
        raise Unauthenticated(identity)
    return identity


@lru_cache(maxsize=PEER_CACHE_SIZE)
def _identity(pem: str) -> tuple[SpiffeId, x509.Certificate] | str:
    """(SPIFFE ID, certificate) of a client certificate, or why it names no caller."""
    cert = x509.load_pem_x509_certificate(pem.encode())
    try:
        # The handshake has checked it is an X509-SVID leaf already.
        return spiffe_id_from_certificate(cert, leaf=False), cert
    except NotAnX509Svid as err:
        if err.problem == "uri_sans":
            return "the client certificate is not an X509-SVID (needs one URI SAN)"
        return "the client certificate's URI SAN is not a SPIFFE ID"
