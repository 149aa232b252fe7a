"""grpcio over mTLS with SVIDs from a source.

::

    server = grpc.server(ThreadPoolExecutor(), interceptors=[
        AuthorizingInterceptor(authorize_id("spiffe://example.org/web")),
    ])
    server.add_secure_port("0.0.0.0:50051", server_credentials(source))

    channels = RotatingChannel(source, "api.internal:50051")
    stub = EchoStub(channels.channel())      # ask again after rotations

    def Echo(self, request, context):
        caller = caller_spiffe_id(context)   # in a handler

What rotates and what does not:

- :func:`server_credentials` are grpcio's *dynamic* server credentials: grpcio
  asks for the certificate configuration before every handshake, and gets a
  new one after the source changed. The server follows rotation in place.
- grpcio channel credentials are fixed when made: a channel keeps the SVID
  and bundle it was built with. :func:`channel_credentials` builds them once;
  :class:`RotatingChannel` builds a new channel after each change of the
  source (the one before is closed at the following rotation, so calls in
  flight on it can finish).

Limits of grpcio (it exposes no certificate verification hook in Python):

- a client checks the server's certificate chain and its **DNS name** (the
  target, or the ``grpc.ssl_target_name_override`` channel option), not its
  SPIFFE ID: give server SVIDs a DNS SAN (``--dns`` on the entry);
- a server authorizes the client's SPIFFE ID per call, in
  :class:`AuthorizingInterceptor`, after the handshake (PERMISSION_DENIED);
- the check that a chain ends at the bundle of the peer's own trust domain
  (see :mod:`sdk.tls`) cannot be made: every bundle of the source is a root
  for every ID. Give grpcio sources only the trust domains you call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization

from sdk.authorize import Authorizer
from sdk.errors import AuthenticationError, SdkError, SourceError
from sdk.peer import spiffe_id_from_pem
from sdk.sources import ChangeCounter, X509Source
from sdk.spiffeid import SpiffeId

__all__ = [
    "AuthorizingInterceptor",
    "RotatingChannel",
    "caller_spiffe_id",
    "channel_credentials",
    "server_credentials",
]


def channel_credentials(source: X509Source) -> Any:
    """``grpc.ChannelCredentials`` with the source's current SVID and every bundle (fixed)."""
    key, chain, roots = _pem_material(source)
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=chain
    )


def server_credentials(source: X509Source, *, require_client_auth: bool = True) -> Any:
    """``grpc.ServerCredentials`` that follow the source, rebuilt after each change."""
    changes = ChangeCounter(source)
    lock = threading.Lock()
    built_for = [changes.value]

    def configuration() -> Any:
        key, chain, roots = _pem_material(source)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def fetch() -> Any:
        with lock:
            current = changes.value
            if current == built_for[0]:
                return None  # grpcio keeps the configuration it has
            built_for[0] = current
        return configuration()

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=require_client_auth
    )


class RotatingChannel:
    """A ``grpc.Channel`` over mTLS, replaced by a new one after each change of the source."""

    def __init__(
        self,
        source: X509Source,
        target: str,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._source = source
        self._target = target
        self._options = list(options)
        self._changes = ChangeCounter(source)
        self._lock = threading.Lock()
        self._built_for = self._changes.value
        self._channel: Any = self._new_channel()
        self._previous: Any = None

    def channel(self) -> Any:
        """The channel built from the current material; make stubs from it per use."""
        with self._lock:
            current = self._changes.value
            if current != self._built_for:
                self._built_for = current
                if self._previous is not None:
                    self._previous.close()
                self._previous, self._channel = self._channel, self._new_channel()
            return self._channel

    def close(self) -> None:
        with self._lock:
            for channel in (self._previous, self._channel):
                if channel is not None:
                    channel.close()
            self._previous = None

    def _new_channel(self) -> Any:
        return grpc.secure_channel(self._target, channel_credentials(self._source), self._options)


def caller_spiffe_id(context: Any) -> SpiffeId:
    """The SPIFFE ID of the client certificate on a ``grpc.ServicerContext``."""
    certificates = context.auth_context().get("x509_pem_cert") or []
    if not certificates:
        raise AuthenticationError(
            "no client certificate was presented; call over mTLS with an X509-SVID"
        )
    return spiffe_id_from_pem(certificates[0])


class AuthorizingInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Runs ``authorizer`` on the caller's SPIFFE ID before every call's handler.

    Refusals end the call: UNAUTHENTICATED without an X509-SVID,
    PERMISSION_DENIED (with the reason) when the authorizer refuses.
    """

    _BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        wrapped = {
            name: self._guard(behaviour)
            for name in self._BEHAVIOURS
            if (behaviour := getattr(handler, name)) is not None
        }
        return handler._replace(**wrapped)

    def _guard(self, behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def guarded(request: Any, context: Any) -> Any:
            try:
                self._authorizer(caller_spiffe_id(context))
            except SdkError as err:
                code = (
                    grpc.StatusCode.UNAUTHENTICATED
                    if isinstance(err, AuthenticationError)
                    else grpc.StatusCode.PERMISSION_DENIED
                )
                context.abort(code, err.message)
            return behaviour(request, context)

        return guarded


def _pem_material(source: X509Source) -> tuple[bytes, bytes, bytes]:
    """The key, chain and every bundle's CAs, as the PEM bytes grpcio takes."""
    svid = source.x509_svid()
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    roots = b"".join(
        authority.public_bytes(serialization.Encoding.PEM)
        for bundle in source.x509_bundles()
        for authority in bundle.x509_authorities
    )
    if not roots:
        raise SourceError("the source holds no X.509 bundle, so no peer can be verified")
    return key, chain, roots
