"""The bundle endpoint: this trust domain's SPIFFE bundle, served over HTTPS at
``GET /`` to the trust domains that federate with it.

    [federation.bundle_endpoint]
    address = "0.0.0.0:8443"
    profile = "https_spiffe"     # or "https_web" with cert_file and key_file

    config = bundle_endpoint_server_config(
        endpoint, authorities.bundle, server.server_identity, guard, limits)
    await LimitedServer(config, limits).serve()

With ``https_spiffe`` the endpoint presents the server's own SVID (which
rotates: :class:`ca.api.tls.RotatingServerContext` picks the current one per
handshake), and clients check it against the bundle they already hold of this
trust domain. With ``https_web`` it presents a web PKI certificate from
``cert_file`` and ``key_file``; :class:`ServingCertificate` reads them again
when either file changes, so a renewed certificate is served without a
restart. The document is public: anyone may fetch it, so its listener is held
to the same limits as the node API (:mod:`ca.api.limits`), with a guard of its own.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Response

from ca.api.errors import install_error_handlers
from ca.api.limits import ConnectionGuard, listener_config
from ca.api.tls import RotatingServerContext, ServerIdentity
from ca.bundle import TrustBundle
from ca.config import BundleEndpointConfig, ConnectionLimits
from ca.errors import ConfigError

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


class ServingCertificate:
    """An SSLContext serving the PEM chain in ``cert_file`` and the key in ``key_file``,
    re-read at the next handshake after either file changes.

    A file that cannot be loaded at start is a ConfigError; a bad replacement later
    is logged and the certificate loaded before goes on being served.
    """

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self._files = (cert_file, key_file)
        self._stamp = self._read_stamp()
        self._current = self._build()
        self.context = self._build()
        self.context.sni_callback = self._select

    def current(self) -> ssl.SSLContext:
        try:
            stamp = self._read_stamp()
        except ConfigError as err:
            log.warning("%s; serving the certificate loaded before", err.message)
            return self._current
        if stamp != self._stamp:
            try:
                self._current = self._build()
                log.info("the bundle endpoint now serves the certificate in %s", self._files[0])
            except ConfigError as err:
                log.warning("%s; serving the certificate loaded before", err.message)
            self._stamp = stamp
        return self._current

    def _select(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        sock.context = self.current()

    def _read_stamp(self) -> tuple[tuple[int, int, int], ...]:
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

    def _build(self) -> ssl.SSLContext:
        cert_file, key_file = self._files
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as err:
            reason = getattr(err, "strerror", None) or getattr(err, "reason", None) or str(err)
            raise ConfigError(
                f"cannot load the bundle endpoint certificate {cert_file} with key "
                f"{key_file} ({reason}); they must be a PEM certificate chain and its "
                "matching unencrypted PEM private key"
            ) from err
        return context


def bundle_endpoint_context(
    endpoint: BundleEndpointConfig, identity: Callable[[], ServerIdentity]
) -> ssl.SSLContext:
    """The TLS context the endpoint serves with, for its profile."""
    if endpoint.profile == "https_web":
        assert endpoint.cert_file is not None and endpoint.key_file is not None
        return ServingCertificate(endpoint.cert_file, endpoint.key_file).context
    return RotatingServerContext(identity, require_client=False).context


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
