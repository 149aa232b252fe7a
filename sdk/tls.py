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
- **Material rotated by its owner.** A server that renews its own certificate
  and bundle (Tessera's server does) hands :func:`server_context` a function
  giving the current :class:`TlsMaterial` and a cheap ``version`` function;
  before each handshake the version is asked, and the context rebuilt when it
  moved. Such a server may let clients come without a certificate
  (``client_certificate="optional"``: one presented is verified and authorized
  all the same), or, without an authorizer, ask for none.

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
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from sdk.authorize import Authorizer
from sdk.errors import AuthenticationError, SdkError, SourceError
from sdk.peer import spiffe_id_from_der
from sdk.spiffeid import SpiffeId, TrustDomain
from sdk.tls_material import load_identity

if TYPE_CHECKING:  # a context made from a source imports sdk.sources then (below): a
    # server's own context (server_context) needs no Workload API client
    from sdk.sources import X509BundleSource, X509Source

__all__ = [
    "ClientCertificate",
    "TlsMaterial",
    "X509Authorities",
    "mtls_client_context",
    "mtls_server_context",
    "peer_spiffe_id",
    "server_context",
    "tls_client_context",
]

_log = logging.getLogger(__name__)

MINIMUM_TLS_VERSION: Final = ssl.TLSVersion.TLSv1_2
# Sessions this context authorized, so a resumed one can be checked again (OpenSSL's own
# server cache holds 20480 by default).
_REMEMBERED_SESSIONS: Final = 32768


ClientCertificate = Literal["required", "optional"]
"""Whether a server context's clients must present an X509-SVID, or may present none."""


class X509Authorities(Protocol):
    """What a context needs of a bundle: a ``spiffe.X509Bundle``, or a
    :class:`sdk.bundle.TrustBundle` as it is (a server has no reason to convert its own)."""

    @property
    def trust_domain(self) -> TrustDomain: ...

    @property
    def x509_authorities(self) -> Iterable[x509.Certificate]: ...


@dataclass(frozen=True)
class TlsMaterial:
    """What a context presents and whom it trusts, as its owner holds them at one moment."""

    cert_chain: Sequence[x509.Certificate] = ()
    """The certificate presented, leaf first, then intermediates; none for a client without."""
    private_key: PrivateKeyTypes | None = None
    bundles: Sequence[X509Authorities] = ()
    """The trust domains whose X509-SVIDs peers may present."""


def mtls_server_context(
    source: X509Source,
    authorizer: Authorizer,
    *,
    client_certificate: ClientCertificate = "required",
) -> ssl.SSLContext:
    """A server context presenting the source's SVID and requiring an authorized client SVID
    (or, with ``client_certificate="optional"``, authorizing one if the client presents it)."""
    from sdk.sources import ChangeCounter

    changes = ChangeCounter(source)
    return _Rotation(
        _source_material(source, source, "server"), lambda: changes.value, authorizer,
        server_side=True, client_certificate=client_certificate,
    ).context  # fmt: skip


def mtls_client_context(source: X509Source, authorizer: Authorizer) -> ssl.SSLContext:
    """A client context presenting the source's SVID and requiring an authorized server SVID."""
    from sdk.sources import ChangeCounter

    changes = ChangeCounter(source)
    return _Rotation(
        _source_material(source, source, "client"), lambda: changes.value, authorizer,
        server_side=False,
    ).context  # fmt: skip


def tls_client_context(bundle_source: X509BundleSource, authorizer: Authorizer) -> ssl.SSLContext:
    """A client context without an SVID of its own that requires an authorized server SVID."""
    from sdk.sources import ChangeCounter

    changes = ChangeCounter(bundle_source)
    return _Rotation(
        _source_material(bundle_source, None, "client"), lambda: changes.value, authorizer,
        server_side=False,
    ).context  # fmt: skip


def server_context(
    material: Callable[[], TlsMaterial],
    *,
    version: Callable[[], Hashable],
    authorizer: Authorizer | None,
    client_certificate: ClientCertificate = "required",
) -> ssl.SSLContext:
    """A server context for material its owner rotates itself.

    Before each handshake ``version()`` is called (keep it cheap); when it returns
    something new, the context presents and trusts ``material()`` from then on (if that
    raises or OpenSSL refuses the material, the previous one is kept and the error
    logged). With an ``authorizer``, clients present X509-SVIDs of the material's
    bundles, which it authorizes (``client_certificate="optional"``: or none at all);
    without one, no client certificate is asked for. Errors of the first ``material()``
    are raised here.
    """
    return _Rotation(
        material, version, authorizer, server_side=True, client_certificate=client_certificate
    ).context


def peer_spiffe_id(connection: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The SPIFFE ID the peer proved and the authorizer allowed on this connection."""
    verified = getattr(connection, "_tessera_verified", None)
    if not isinstance(verified, _Verified):
        raise AuthenticationError(
            "this TLS connection has no authorized SPIFFE ID: it was not made with a context "
            "from sdk.tls, or its handshake has not completed"
        )
    if verified.peer_id is None:
        raise AuthenticationError("the peer presented no certificate on this connection")
    return verified.peer_id


def _source_material(
    bundle_source: X509BundleSource, svid_source: X509Source | None, side: str
) -> Callable[[], TlsMaterial]:
    def material() -> TlsMaterial:
        bundles = bundle_source.x509_bundles()
        if svid_source is None:
            return TlsMaterial(bundles=bundles)
        svid = svid_source.x509_svid()
        _log.debug("TLS %s: now presenting %s", side, svid.spiffe_id)
        return TlsMaterial(svid.cert_chain, svid.private_key, bundles)

    return material


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

    peer_id: SpiffeId | None
    """None: the client presented no certificate (where that is allowed), or none was asked."""
    anchor: bytes | None


_ANONYMOUS: Final = _Verified(peer_id=None, anchor=None)


class _Rotation:
    """Builds a context per generation of material; hands out the current one."""

    def __init__(
        self,
        material: Callable[[], TlsMaterial],
        version: Callable[[], Hashable],
        authorizer: Authorizer | None,
        *,
        server_side: bool,
        client_certificate: ClientCertificate = "required",
    ) -> None:
        self.authorizer = authorizer
        self.side = "server" if server_side else "client"
        self.certificate_optional = server_side and client_certificate == "optional"
        self._material = material
        self._version = version
        self._server_side = server_side
        self._lock = threading.Lock()
        self._alpn: list[str] | None = None
        self._sessions: OrderedDict[bytes, _Verified] = OrderedDict()
        # Take the version before the first build, so that no change in between is missed.
        self._built_for = version()
        self._generation = self._build(material())
        self.context = self._generation.context
        """The context handed to the caller: the first generation's."""

    def current(self) -> _Generation:
        """The generation built from the latest material (rebuilt if its version moved)."""
        with self._lock:
            try:
                version = self._version()
                if version != self._built_for:
                    self._built_for = version
                    self._generation = self._build(self._material())
            except Exception as err:  # a handshake must not fail because a source did
                reason = err if isinstance(err, SdkError) else repr(err)
                _log.error(
                    "TLS %s: keeping the previous SVID and bundles, the new ones do not "
                    "load: %s", self.side, reason,
                )  # fmt: skip
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

    def _build(self, material: TlsMaterial) -> _Generation:
        verifies = self.authorizer is not None
        anchors = {
            bundle.trust_domain: frozenset(
                authority.public_bytes(serialization.Encoding.DER)
                for authority in bundle.x509_authorities
            )
            for bundle in material.bundles
        }
        if verifies and not any(anchors.values()):
            raise SourceError("the source holds no X.509 bundle, so no peer can be verified")
        context = _SpiffeContext(
            ssl.PROTOCOL_TLS_SERVER if self._server_side else ssl.PROTOCOL_TLS_CLIENT
        )
        context.tessera_rotation = self
        context.minimum_version = MINIMUM_TLS_VERSION
        context.options |= ssl.OP_NO_RENEGOTIATION
        if verifies:
            context.check_hostname = False
            optional = self.certificate_optional
            context.verify_mode = ssl.CERT_OPTIONAL if optional else ssl.CERT_REQUIRED
            # Any certificate of a bundle is a trust anchor, self-signed or not (SPIFFE bundles).
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            if self._server_side:
                context.options |= ssl.OP_NO_TICKET
                context.num_tickets = 0
        try:
            if verifies:
                cadata = b"".join(sorted(set().union(*anchors.values())))
                context.load_verify_locations(cadata=cadata)
            if material.cert_chain:
                if material.private_key is None:
                    raise SourceError("the material has a certificate chain but no private key")
                load_identity(context, material.cert_chain, material.private_key)
        except ssl.SSLError as err:
            raise SourceError(f"OpenSSL does not accept the SVID or bundles: {err}") from err
        if self._alpn is not None:
            ssl.SSLContext.set_alpn_protocols(context, self._alpn)
        return _Generation(context=context, anchors=anchors)


# -- the handshake -----------------------------------------------------------------------


def _adopt_current(connection: ssl.SSLObject | ssl.SSLSocket) -> _Generation:
    """Before the first handshake step: switch the connection to the current generation."""
    rotation = _rotation_of(connection)
    generation = rotation.current()
    if generation.context is not connection.context:
        connection.context = generation.context
    return generation


def _authorize_peer(
    connection: ssl.SSLObject | ssl.SSLSocket, generation: _Generation
) -> _Verified:
    """After OpenSSL's handshake: what the peer proved if the authorizer allows it, else a
    failure."""
    rotation = _rotation_of(connection)
    authorizer = rotation.authorizer
    if authorizer is None:
        return _ANONYMOUS  # no client certificate was asked for
    try:
        verified = _verify_peer(connection, generation, rotation)
        if verified.peer_id is not None:
            authorizer(verified.peer_id)
    except Exception as err:
        _log.info("TLS %s: refused the peer: %s", rotation.side, err)
        raise _handshake_failure(err) from err
    rotation.remember(connection, verified)
    return verified


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
            if rotation.certificate_optional:
                return _ANONYMOUS
            raise AuthenticationError("the peer presented no certificate")
        chain = _verified_chain(connection)
        if not chain:
            raise AuthenticationError("OpenSSL reported no verified chain for the peer")
        verified = _Verified(peer_id=spiffe_id_from_der(der), anchor=chain[-1])
    if verified.peer_id is None:
        return verified  # a resumed session of a client that presented no certificate
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
    _tessera_verified: _Verified | None = None

    def do_handshake(self) -> None:
        if self._tessera_generation is None:
            self._tessera_generation = _adopt_current(self)
        super().do_handshake()
        self._tessera_verified = _authorize_peer(self, self._tessera_generation)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        if self._tessera_verified is None:
            self.do_handshake()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        if self._tessera_verified is None:
            self.do_handshake()
        return super().write(data)


class _AuthorizingSSLSocket(ssl.SSLSocket):
    """The socket TLS object (blocking clients and servers) that authorizes in its handshake."""

    _tessera_generation: _Generation | None = None
    _tessera_verified: _Verified | None = None

    def do_handshake(self, block: bool = False) -> None:
        if self._tessera_generation is None:
            self._tessera_generation = _adopt_current(self)
        super().do_handshake(block)
        self._tessera_verified = _authorize_peer(self, self._tessera_generation)

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
        if self._tessera_verified is None and getattr(self, "_sslobj", None) is not None:
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
