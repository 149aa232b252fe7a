"""The bundle endpoint: this trust domain's SPIFFE bundle, served over HTTPS at
``GET /`` to the trust domains that federate with it.

    [federation.bundle_endpoint]
    address = "0.0.0.0:8443"
    profile = "https_spiffe"     # or "https_web" with cert_file and key_file

    config = bundle_endpoint_server_config(
        endpoint, authorities.bundle, server.server_identity, guard, limits)
    await LimitedServer(config, limits).serve()

With ``https_spiffe`` the endpoint presents the server's own SVID, in the
node API's context (:func:`ca.api.tls.server_tls_context`, which follows its
renewal), and clients check it against the bundle they already hold of this
trust domain. With ``https_web`` it presents a web PKI certificate from
``cert_file`` and ``key_file``; :class:`ServingCertificate` reads them again
when either file changes, so a renewed certificate is served without a
restart. Both contexts are :mod:`sdk.tls`'s. The document is public: anyone
may fetch it, so its listener is held to the same limits as the node API
(:mod:`ca.api.limits`), with a guard of its own.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from fastapi import FastAPI, Response

from ca.api.errors import install_error_handlers
from ca.api.limits import ConnectionGuard, listener_config
from ca.api.tls import ServerIdentity, server_tls_context
from ca.config import BundleEndpointConfig, ConnectionLimits
from sdk.bundle import TrustBundle
from sdk.errors import ConfigError
from sdk.tls import TlsMaterial, server_context

log = logging.getLogger(__name__)

SPIFFE_BUNDLE_MEDIA_TYPE = "application/json"


def create_bundle_endpoint_app(bundle: Callable[[], TrustBundle]) -> FastAPI:
    """An app answering ``GET /`` with the SPIFFE bundle document ``bundle()`` gives."""
    app = FastAPI(
        title="Tessera bundle endpoint", openapi_url=None, docs_url=None, redoc_url=None
    )
    install_error_handlers(app)

    @app.get("/")
    def serve_bundle() -> Response:
        return Response(bundle().to_spiffe_json(), media_type=SPIFFE_BUNDLE_MEDIA_TYPE)

    return app


Stamp = tuple[tuple[int, int, int], ...]


class ServingCertificate:
    """An SSLContext serving the PEM chain in ``cert_file`` and the key in ``key_file``,
    read again for the next handshake after either file changes.

    A file that cannot be loaded at start is a ConfigError; a bad replacement later
    is logged and the certificate loaded before goes on being served.
    """

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self._files = (cert_file, key_file)
        self._stamp: Stamp = ()
        self._served: TlsMaterial | None = None
        # No client certificate is asked for: the document is public.
        self.context = server_context(self._material, version=self._version, authorizer=None)

    def _version(self) -> Stamp:
        """The files' stamps; those read before (and a warning) if they cannot be read now."""
        try:
            self._stamp = self._read_stamp()
        except ConfigError as err:
            if self._served is None:
                raise  # at start: the caller's to report
            log.warning("%s; serving the certificate loaded before", err.message)
        return self._stamp

    def _material(self) -> TlsMaterial:
        """The certificate to serve from now on: the files', or the one loaded before."""
        if self._served is None:
            self._served = self._load()  # at start, a ConfigError is the caller's
            return self._served
        try:
            self._served = self._load()
            log.info("the bundle endpoint now serves the certificate in %s", self._files[0])
        except ConfigError as err:
            log.warning("%s; serving the certificate loaded before", err.message)
        return self._served

    def _read_stamp(self) -> Stamp:
        stamps = []
        for path in self._files:
            try:
                info = os.stat(path)
            except OSError as err:
                raise ConfigError(
                    f"cannot read the bundle endpoint's {path}: {err.strerror}; check "
                    "[federation.bundle_endpoint] cert_file and key_file"
                ) from err
            stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
        return tuple(stamps)

    def _load(self) -> TlsMaterial:
        cert_file, key_file = self._files
        try:
            chain = x509.load_pem_x509_certificates(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
                raise ValueError("the key is not the certificate's")
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise ConfigError(
                f"cannot load the bundle endpoint certificate {cert_file} with key "
                f"{key_file} ({reason}); they must be a PEM certificate chain and its "
                "matching unencrypted PEM private key"
            ) from err
        return TlsMaterial(cert_chain=chain, private_key=key)


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def bundle_endpoint_context(
    endpoint: BundleEndpointConfig, identity: Callable[[], ServerIdentity]
) -> ssl.SSLContext:
    """The TLS context the endpoint serves with, for its profile."""
    if endpoint.profile == "https_web":
        assert endpoint.cert_file is not None and endpoint.key_file is not None
        return ServingCertificate(endpoint.cert_file, endpoint.key_file).context
    return server_tls_context(identity)


def bundle_endpoint_server_config(
    endpoint: BundleEndpointConfig,
    bundle: Callable[[], TrustBundle],
    identity: Callable[[], ServerIdentity],
    guard: ConnectionGuard,
    limits: ConnectionLimits,
) -> uvicorn.Config:
    """A loaded uvicorn configuration for the bundle endpoint listener, its connections
    held to ``limits`` like the node API's (serve it with :class:`ca.api.limits.LimitedServer`)."""
    return listener_config(
        create_bundle_endpoint_app(bundle), guard, limits,
        host=endpoint.host, port=endpoint.port,
        ssl_context=bundle_endpoint_context(endpoint, identity),
    )
