"""A peer's SPIFFE ID, read from the X509-SVID it presented.

The one place the SDK turns a certificate into an identity; TLS, ASGI and
gRPC all go through it::

    peer_id = spiffe_id_from_certificate(x509.load_der_x509_certificate(der))

The certificate must already be verified against a bundle; this only checks
that it is shaped like an X509-SVID leaf (exactly one URI SAN holding a
SPIFFE ID with a path, not a CA) and raises
:class:`~sdk.errors.AuthenticationError` saying what is missing otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509
from spiffe import SpiffeId

from sdk.errors import AuthenticationError, InvalidArgument
from sdk.spiffeid import parse_spiffe_id

__all__ = ["spiffe_id_from_certificate", "spiffe_id_from_der", "spiffe_id_from_pem"]


def spiffe_id_from_certificate(certificate: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in the URI SAN of an X509-SVID leaf."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise AuthenticationError(
            f"the peer's certificate is not an X509-SVID: it has {len(uris)} URI SANs, "
            "an X509-SVID has exactly one"
        )
    try:
        spiffe_id = parse_spiffe_id(uris[0], what="the URI SAN of the peer's certificate")
    except InvalidArgument as err:
        raise AuthenticationError(
            f"the peer's certificate is not an X509-SVID: {err.message}"
        ) from err
    if not spiffe_id.path:
        raise AuthenticationError(
            f"the peer's certificate is not an X509-SVID: {spiffe_id} has no path "
            "(only signing certificates name a bare trust domain)"
        )
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise AuthenticationError(
            f"the peer's certificate for {spiffe_id} is a CA certificate, not an X509-SVID leaf",
            peer_id=spiffe_id,
        )
    return spiffe_id


def spiffe_id_from_der(der: bytes) -> SpiffeId:
    return spiffe_id_from_certificate(_load(x509.load_der_x509_certificate, der))


def spiffe_id_from_pem(pem: bytes | str) -> SpiffeId:
    data = pem.encode() if isinstance(pem, str) else pem
    return spiffe_id_from_certificate(_load(x509.load_pem_x509_certificate, data))


def _load(loader: Callable[[bytes], x509.Certificate], data: bytes) -> x509.Certificate:
    try:
        return loader(data)
    except ValueError as err:
        raise AuthenticationError(f"the peer's certificate cannot be parsed: {err}") from err
