"""``ssl.SSLContext`` builders for mTLS with SPIFFE IDs, following every rotation.

::

    source = WorkloadApiX509Source()
    server = mtls_server_context(source, authorize_member_of("example.org"))
    await asyncio.start_server(handle, "0.0.0.0", 8443, ssl=server)

    client = mtls_client_context(source, authorize_id("spiffe://example.org/api"))
    reader, writer = await asyncio.open_connection("api", 8443, ssl=client,
                                                   server_hostname="api")
    peer_spiffe_id(writer.get_extra_info("ssl_object"))   # who answered

What the contexts guarantee:

- **Peers are named by SPIFFE ID, not host name.** Host name checking is off;
  the peer must present an X509-SVID that chains to a bundle the source
  holds, and the ID in its URI SAN is what the authorizer judges.
- **Authorization happens in the handshake.** Python's ``ssl`` has no verify
  callback, so the contexts hand out their own ``SSLObject``/``SSLSocket``
  subclasses whose ``do_handshake`` runs the authorizer once OpenSSL has
  verified the chain and before ``do_handshake`` returns. A refusal fails
  the handshake with ``ssl.SSLCertVerificationError`` (the SDK error as its
  ``__cause__``), so no application byte is read or written on that
  connection; ``read``/``write`` run the handshake first if nobody did.
- **A trust domain vouches only for its own IDs.** OpenSSL gets one store
  with every trust domain's anchors (own and federated). After it verified
  the chain, the SDK checks that the anchor the chain ended at is in the
  bundle of the *peer's* trust domain, so a federated CA cannot mint an ID
  of another trust domain.
- **Rotation without a restart.** Each handshake first adopts the context
  built from the source's current SVID and bundles (``SSLObject.context =
  ...``, as a server's ``sni_callback`` would), rebuilt only after the source
  reported a change. Connections already open keep the identity they were
  made with. Private keys reach OpenSSL through a memfd, never the disk.

Limits: TLS 1.2 or later. In TLS 1.3 the client has sent its last handshake
message before the server can judge its certificate, so a client refused by
the server sees its connection closed rather than a TLS alert. A resumed TLS
session is authorized again, and accepted only if this context authorized its
full handshake and the anchor is still trusted; server contexts issue no
session tickets. Versions, options and ciphers set on the returned context
apply to every connection (OpenSSL copies them when a connection is made);
what OpenSSL reads from the context during the handshake (certificate, trust
store, a server's ALPN choice, ``sni_callback``) comes from the generation
context, to which only ``set_alpn_protocols`` is forwarded.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, TrustDomain

from sdk.authorize import Authorizer
from sdk.errors import AuthenticationError, SdkError, SourceError
from sdk.peer import spiffe_id_from_der
from sdk.sources import ChangeCounter, X509BundleSource, X509Source
from sdk.tls_material import load_identity

__all__ = [
    "mtls_client_context",
    "mtls_server_context",
    "peer_spiffe_id",
    "tls_client_context",
]

_log = logging.getLogger(__name__)

MINIMUM_TLS_VERSION: Final = ssl.TLSVersion.TLSv1_2
# Sessions this context authorized, so a resumed one can be checked again (OpenSSL's own
# server cache holds 20480 by default).
_REMEMBERED_SESSIONS: Final = 32768


def mtls_server_context(source: X509Source, authorizer: Authorizer) -> ssl.SSLContext:
    """A server context presenting the source's SVID and requiring an authorized client SVID."""
    return _Rotation(source, source, authorizer, server_side=True).context


def mtls_client_context(source: X509Source, authorizer: Authorizer) -> ssl.SSLContext:
    """A client context presenting the source's SVID and requiring an authorized server SVID."""
    return _Rotation(source, source, authorizer, server_side=False).context


def tls_client_context(bundle_source: X509BundleSource, authorizer: Authorizer) -> ssl.SSLContext:
    """A client context without an SVID of its own that requires an authorized server SVID."""
    return _Rotation(bundle_source, None, authorizer, server_side=False).context


def peer_spiffe_id(connection: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The SPIFFE ID the peer proved and the authorizer allowed on this connection."""
    peer_id = getattr(connection, "_tessera_peer_id", None)
    if not isinstance(peer_id, SpiffeId):
        raise AuthenticationError(
            "this TLS connection has no authorized SPIFFE ID: it was not made with a context "
            "from sdk.tls, or its handshake has not completed"
        )
    return peer_id


# -- one context per generation of material ----------------------------------------------


@dataclass(frozen=True)
class _Generation:
    """A context built from one SVID and set of bundles, and the anchors it trusts."""

    context: _SpiffeContext
    anchors: Mapping[TrustDomain, frozenset[bytes]]
    """DER of each trust domain's X.509 authorities."""


@dataclass(frozen=True)
class _Verified:
    """What a full handshake established, kept so a resumed session can be checked again."""

    peer_id: SpiffeId
    anchor: bytes


class _Rotation:
    """Builds a context per generation of the source's material; hands out the current one."""

    def __init__(
        self,
        bundle_source: X509BundleSource,
        svid_source: X509Source | None,
        authorizer: Authorizer,
        *,
        server_side: bool,
    ) -> None:
        self.authorizer = authorizer
        self.side = "server" if server_side else "client"
        self._bundle_source = bundle_source
        self._svid_source = svid_source
        self._server_side = server_side
        self._lock = threading.Lock()
        self._alpn: list[str] | None = None
        self._sessions: OrderedDict[bytes, _Verified] = OrderedDict()
        # Count changes before the first build, so that none in between is missed.
        self._changes = ChangeCounter(bundle_source)
        self._built_for = self._changes.value
        self._generation = self._build()
        self.context = self._generation.context
        """The context handed to the caller: the first generation's."""

    def current(self) -> _Generation:
        """The generation built from the latest material (rebuilt if the source changed)."""
        with self._lock:
            changes = self._changes.value
            if changes != self._built_for:
                try:
                    self._generation = self._build()
                except Exception as err:  # a handshake must not fail because a source did
                    reason = err if isinstance(err, SdkError) else repr(err)
                    _log.error(
                        "TLS %s: keeping the previous SVID and bundles, the new ones do not "
                        "load: %s", self.side, reason,
                    )  # fmt: skip
                self._built_for = changes
            return self._generation

    def set_alpn_protocols(self, protocols: list[str]) -> None:
        with self._lock:
            self._alpn = protocols
            generation = self._generation
        ssl.SSLContext.set_alpn_protocols(generation.context, protocols)

    def remember(self, connection: ssl.SSLObject | ssl.SSLSocket, verified: _Verified) -> None:
        if self._server_side and connection.version() == "TLSv1.3":
            # Server contexts send no TLS 1.3 session tickets, so such a session can never be
            # resumed; reading ``session`` would cost a tenth of the handshake for nothing.
            return
        session = connection.session
        if session is None:
            return
        with self._lock:
            self._sessions[session.id] = verified
            while len(self._sessions) > _REMEMBERED_SESSIONS:
                self._sessions.popitem(last=False)

    def recall(self, connection: ssl.SSLObject | ssl.SSLSocket) -> _Verified | None:
        session = connection.session
        if session is None:
            return None
        with self._lock:
            return self._sessions.get(session.id)

    def _build(self) -> _Generation:
        bundles = self._bundle_source.x509_bundles()
        svid = self._svid_source.x509_svid() if self._svid_source is not None else None
        anchors = {
            bundle.trust_domain: frozenset(
                authority.public_bytes(serialization.Encoding.DER)
                for authority in bundle.x509_authorities
            )
            for bundle in bundles
        }
        if not any(anchors.values()):
            raise SourceError("the source holds no X.509 bundle, so no peer can be verified")
        context = _SpiffeContext(
            ssl.PROTOCOL_TLS_SERVER if self._server_side else ssl.PROTOCOL_TLS_CLIENT
        )
        context.tessera_rotation = self
        context.minimum_version = MINIMUM_TLS_VERSION
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        # Any certificate of a bundle is a trust anchor, self-signed or not (SPIFFE bundles).
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.options |= ssl.OP_NO_RENEGOTIATION
        if self._server_side:
            context.options |= ssl.OP_NO_TICKET
            context.num_tickets = 0
        try:
            context.load_verify_locations(cadata=b"".join(sorted(set().union(*anchors.values()))))
            if svid is not None:
                load_identity(context, svid.cert_chain, svid.private_key)
        except ssl.SSLError as err:
            raise SourceError(f"OpenSSL does not accept the SVID or bundles: {err}") from err
        if self._alpn is not None:
            ssl.SSLContext.set_alpn_protocols(context, self._alpn)
        if svid is not None:
            _log.debug("TLS %s: now presenting %s", self.side, svid.spiffe_id)
        return _Generation(context=context, anchors=anchors)


# -- the handshake -----------------------------------------------------------------------


def _adopt_current(connection: ssl.SSLObject | ssl.SSLSocket) -> _Generation:
    """Before the first handshake step: switch the connection to the current generation."""
    rotation = _rotation_of(connection)
    generation = rotation.current()
    if generation.context is not connection.context:
        connection.context = generation.context
    return generation


def _authorize_peer(connection: ssl.SSLObject | ssl.SSLSocket, generation: _Generation) -> SpiffeId:
    """After OpenSSL's handshake: the peer's ID if the authorizer allows it, else a failure."""
    rotation = _rotation_of(connection)
    try:
        verified = _verify_peer(connection, generation, rotation)
        rotation.authorizer(verified.peer_id)
    except Exception as err:
        _log.info("TLS %s: refused the peer: %s", rotation.side, err)
        raise _handshake_failure(err) from err
    rotation.remember(connection, verified)
    return verified.peer_id


def _verify_peer(
    connection: ssl.SSLObject | ssl.SSLSocket, generation: _Generation, rotation: _Rotation
) -> _Verified:
    if connection.session_reused:
        verified = rotation.recall(connection)
        if verified is None:
            raise AuthenticationError(
                "the peer resumed a TLS session this context did not authorize; start a new session"
            )
    else:
        der = connection.getpeercert(binary_form=True)
        if not der:
            raise AuthenticationError("the peer presented no certificate")
        chain = _verified_chain(connection)
        if not chain:
            raise AuthenticationError("OpenSSL reported no verified chain for the peer")
        verified = _Verified(peer_id=spiffe_id_from_der(der), anchor=chain[-1])
    trust_domain = verified.peer_id.trust_domain
    if verified.anchor not in generation.anchors.get(trust_domain, frozenset()):
        raise AuthenticationError(
            f"the certificate of {verified.peer_id} does not chain to the bundle of trust "
            f"domain {trust_domain.name}; a trust domain may only vouch for its own IDs",
            peer_id=verified.peer_id,
        )
    return verified


def _verified_chain(connection: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """DER of the chain OpenSSL verified, leaf first, anchor last."""
    public = getattr(connection, "get_verified_chain", None)  # Python 3.13 and later
    if public is not None:
        return [bytes(der) for der in public() or []]
    # Python 3.10 to 3.12 have it only on the private _ssl object.
    private = getattr(connection, "_sslobj", None)
    certificates: list[Any] = private.get_verified_chain() or [] if private is not None else []
    der_encoding: int = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
    return [c.public_bytes(der_encoding) for c in certificates]


def _handshake_failure(cause: Exception) -> ssl.SSLCertVerificationError:
    message = cause.message if isinstance(cause, SdkError) else f"the authorizer failed: {cause!r}"
    error = ssl.SSLCertVerificationError(1, message)
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    error.library = "SSL"
    error.verify_code = 0
    error.verify_message = message
    return error


def _rotation_of(connection: ssl.SSLObject | ssl.SSLSocket) -> _Rotation:
    context = connection.context
    if not isinstance(context, _SpiffeContext):  # pragma: no cover - contexts are ours
        raise SourceError("the connection's SSL context was not made by sdk.tls")
    return context.tessera_rotation


class _AuthorizingSSLObject(ssl.SSLObject):
    """The memory-BIO TLS object (asyncio, uvicorn, anyio) that authorizes in its handshake."""

    _tessera_generation: _Generation | None = None
    _tessera_peer_id: SpiffeId | None = None

    def do_handshake(self) -> None:
        if self._tessera_generation is None:
            self._tessera_generation = _adopt_current(self)
        super().do_handshake()
        self._tessera_peer_id = _authorize_peer(self, self._tessera_generation)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        if self._tessera_peer_id is None:
            self.do_handshake()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        if self._tessera_peer_id is None:
            self.do_handshake()
        return super().write(data)


class _AuthorizingSSLSocket(ssl.SSLSocket):
    """The socket TLS object (blocking clients and servers) that authorizes in its handshake."""

    _tessera_generation: _Generation | None = None
    _tessera_peer_id: SpiffeId | None = None

    def do_handshake(self, block: bool = False) -> None:
        if self._tessera_generation is None:
            self._tessera_generation = _adopt_current(self)
        super().do_handshake(block)
        self._tessera_peer_id = _authorize_peer(self, self._tessera_generation)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        self._authorized_before_data()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        self._authorized_before_data()
        return super().write(data)

    def send(self, data: Any, flags: int = 0) -> int:
        self._authorized_before_data()
        return super().send(data, flags)

    def _authorized_before_data(self) -> None:
        if self._tessera_peer_id is None and getattr(self, "_sslobj", None) is not None:
            self.do_handshake()


class _SpiffeContext(ssl.SSLContext):
    """An SSLContext whose connections adopt the current generation and authorize the peer."""

    sslobject_class = _AuthorizingSSLObject
    sslsocket_class = _AuthorizingSSLSocket
    tessera_rotation: _Rotation

    def set_alpn_protocols(self, alpn_protocols: Iterable[str]) -> None:
        """Also applied to the contexts built on rotation (servers select from those)."""
        protocols = list(alpn_protocols)
        super().set_alpn_protocols(protocols)
        self.tessera_rotation.set_alpn_protocols(protocols)
