"""The secrets the agent serves Envoy over SDS: a caller's own SVIDs and the bundles it may see.

Named as SPIRE's agent names them, so an Envoy bootstrap written for SPIRE works
against Tessera's agent unchanged:

==============================  ==========================================================
name                            secret
==============================  ==========================================================
``spiffe://example.org/web``    that SVID of the caller's: ``tls_certificate`` (chain and
                                key, inline PEM)
``default``                     the caller's default (first) SVID, as above
``ROOTCA``                      the agent's own trust domain's bundle:
                                ``validation_context.trusted_ca``
``spiffe://partner.test``       that trust domain's bundle, if the caller may see it (its
                                own, or one its entries federate with), as ``ROOTCA``
``ALL``                         every trust domain the caller may see with its bundle, in
                                a ``validation_context`` that uses Envoy's SPIFFE
                                certificate validator (``envoy.tls.cert_validator.spiffe``):
                                a peer's SVID is checked against its own trust domain's
                                bundle only
==============================  ==========================================================

Any other name (someone else's SVID, a trust domain the caller does not federate
with) has no secret, and neither has any name while the caller has no SVID::

    secrets = IdentitySecrets(context, bundles, "example.org")
    secrets.secret("default")       # a Secret message, or None
    secrets.names()                 # what a stream asking for no names gets (as SPIRE's)

Everything is built from what the Workload API serves the same caller
(:class:`~workload_api.identity.X509Context`, ``x509_bundles``), once per name and
state: a rotation is a new :class:`IdentitySecrets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)

from sdk.der import split_certificates
from sdk.errors import InvalidArgument
from workload_api.identity import X509Context, X509SvidMaterial

__all__ = [
    "ALL_BUNDLES_NAME",
    "DEFAULT_SVID_NAME",
    "OWN_BUNDLE_NAME",
    "SPIFFE_VALIDATOR",
    "IdentitySecrets",
]

DEFAULT_SVID_NAME: Final = "default"
OWN_BUNDLE_NAME: Final = "ROOTCA"
ALL_BUNDLES_NAME: Final = "ALL"
SPIFFE_VALIDATOR: Final = "envoy.tls.cert_validator.spiffe"

_SPIFFE_PREFIX: Final = "spiffe://"

# The generated modules build their classes at import time, out of mypy's sight.
_tls: Any = secret_pb2
_common: Any = common_pb2
_core: Any = base_pb2
_extension: Any = extension_pb2
_spiffe_validator: Any = tls_spiffe_validator_config_pb2


class IdentitySecrets:
    """The secrets of one caller in one state of its identity.

    ``context`` and ``bundles`` are what the identity provider gives the caller's
    selectors (``x509_context``, ``x509_bundles``: ``spiffe://<td>`` -> DER CAs);
    ``trust_domain`` is the agent's own, whose bundle ``ROOTCA`` is.
    """

    def __init__(
        self, context: X509Context, bundles: Mapping[str, bytes], trust_domain: str
    ) -> None:
        self._svids: dict[str, X509SvidMaterial] = {}
        for svid in context.svids:
            self._svids.setdefault(svid.spiffe_id, svid)
        self._default = context.svids[0] if context.svids else None
        # A caller without an SVID gets no bundle either, as from the Workload API.
        self._bundles = dict(bundles) if self._default is not None else {}
        self._own = _SPIFFE_PREFIX + trust_domain
        self._built: dict[str, Any] = {}

    @property
    def spiffe_ids(self) -> tuple[str, ...]:
        return tuple(self._svids)

    def names(self) -> list[str]:
        """Every SVID by its SPIFFE ID and every bundle by its trust domain's."""
        return [*self._svids, *self._bundles]

    def secret(self, name: str) -> Any | None:
        """The ``Secret`` message named ``name``, or None if the caller may not have it."""
        built = self._built.get(name)
        if built is None:
            built = self._build(name)
            if built is not None:
                self._built[name] = built
        return built

    def _build(self, name: str) -> Any | None:
        if name == DEFAULT_SVID_NAME:
            return _tls_certificate(name, self._default) if self._default else None
        if name == OWN_BUNDLE_NAME:
            return self._trusted_ca(name, self._own)
        if name == ALL_BUNDLES_NAME:
            return self._all_bundles(name)
        svid = self._svids.get(name)
        if svid is not None:
            return _tls_certificate(name, svid)
        if name.startswith(_SPIFFE_PREFIX) and "/" not in name[len(_SPIFFE_PREFIX) :]:
            return self._trusted_ca(name, name)
        return None

    def _trusted_ca(self, name: str, trust_domain_id: str) -> Any | None:
        bundle = self._bundles.get(trust_domain_id)
        if not bundle:
            return None
        return _tls.Secret(
            name=name,
            validation_context=_common.CertificateValidationContext(
                trusted_ca=_inline(_certificates_pem(bundle))
            ),
        )

    def _all_bundles(self, name: str) -> Any | None:
        if not self._bundles:
            return None
        validator = _spiffe_validator.SPIFFECertValidatorConfig(
            trust_domains=[
                _spiffe_validator.SPIFFECertValidatorConfig.TrustDomain(
                    name=trust_domain_id[len(_SPIFFE_PREFIX) :],
                    trust_bundle=_inline(_certificates_pem(bundle)),
                )
                for trust_domain_id, bundle in sorted(self._bundles.items())
                if bundle
            ]
        )
        custom = _extension.TypedExtensionConfig(name=SPIFFE_VALIDATOR)
        custom.typed_config.Pack(validator)
        return _tls.Secret(
            name=name,
            validation_context=_common.CertificateValidationContext(
                custom_validator_config=custom
            ),
        )


def _tls_certificate(name: str, svid: X509SvidMaterial) -> Any:
    key = serialization.load_der_private_key(svid.private_key_der, password=None)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _tls.Secret(
        name=name,
        tls_certificate=_common.TlsCertificate(
            certificate_chain=_inline(_certificates_pem(svid.cert_chain_der)),
            private_key=_inline(key_pem),
        ),
    )


def _certificates_pem(der: bytes) -> bytes:
    """Concatenated DER certificates (as the Workload API carries them) as PEM."""
    try:
        certificates = split_certificates(der)
    except InvalidArgument as err:
        raise ValueError(f"the agent holds certificates it cannot read: {err.message}") from err
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _inline(data: bytes) -> Any:
    return _core.DataSource(inline_bytes=data)
