"""A peer's SPIFFE ID, read from the X509-SVID it presented.

The one place Tessera turns a certificate's subject alternative names into an
identity; TLS, ASGI, gRPC, the agent and the server all go through it::

    peer_id = spiffe_id_from_certificate(x509.load_der_x509_certificate(der))

The certificate must already be verified against a bundle; this only checks
that it is shaped like an X509-SVID leaf (exactly one URI SAN holding a
SPIFFE ID with a path, not a CA) and raises
:class:`~sdk.errors.NotAnX509Svid` saying what is missing otherwise. The error
names the rule broken (``problem``) and the URI SANs found, so a caller that
words its refusals its own way catches it and raises its own::

    try:
        peer_id = spiffe_id_from_certificate(certificate)
    except NotAnX509Svid as err:
        if err.problem == "uri_sans":
            raise Unauthenticated("the client certificate is not an X509-SVID") from None
        raise

``leaf=False`` reads the ID of any certificate that names exactly one (a
signing certificate's bare trust-domain ID included). :func:`uri_sans` gives
the URI SANs as written, for checks against an expected ID, and
:func:`trust_domains_named` the trust domain each ``spiffe://`` URI SAN names.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509

from sdk.errors import AuthenticationError, InvalidArgument, NotAnX509Svid
from sdk.spiffeid import SpiffeId, parse_spiffe_id

__all__ = [
    "spiffe_id_from_certificate",
    "spiffe_id_from_der",
    "spiffe_id_from_pem",
    "trust_domains_named",
    "uri_sans",
]


def uri_sans(certificate: x509.Certificate) -> list[str]:
    """The certificate's URI SANs as written, in order; none without a SAN extension."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def trust_domains_named(certificate: x509.Certificate) -> list[str]:
    """The trust domain each ``spiffe://`` URI SAN names, as written (not validated): what a
    CA certificate claims, whose SPIFFE ID is its trust domain's."""
    return [
        uri.removeprefix("spiffe://").split("/", 1)[0]
        for uri in uri_sans(certificate)
        if uri.startswith("spiffe://")
    ]


def spiffe_id_from_certificate(certificate: x509.Certificate, *, leaf: bool = True) -> SpiffeId:
    """The SPIFFE ID in the URI SAN of an X509-SVID leaf (of any certificate naming exactly
    one SPIFFE ID, with ``leaf=False``); :class:`~sdk.errors.NotAnX509Svid` otherwise."""
    uris = uri_sans(certificate)
    if len(uris) != 1:
        raise NotAnX509Svid(
            f"the peer's certificate is not an X509-SVID: it has {len(uris)} URI SANs, "
            "an X509-SVID has exactly one",
            problem="uri_sans", uri_sans=uris,
        )  # fmt: skip
    try:
        spiffe_id = parse_spiffe_id(uris[0], what="the URI SAN of the peer's certificate")
    except InvalidArgument as err:
        raise NotAnX509Svid(
            f"the peer's certificate is not an X509-SVID: {err.message}",
            problem="spiffe_id", uri_sans=uris,
        ) from err  # fmt: skip
    if not leaf:
        return spiffe_id
    if not spiffe_id.path:
        raise NotAnX509Svid(
            f"the peer's certificate is not an X509-SVID: {spiffe_id} has no path "
            "(only signing certificates name a bare trust domain)",
            problem="path", uri_sans=uris, peer_id=spiffe_id,
        )  # fmt: skip
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise NotAnX509Svid(
            f"the peer's certificate for {spiffe_id} is a CA certificate, not an X509-SVID leaf",
            problem="ca", uri_sans=uris, peer_id=spiffe_id,
        )  # fmt: skip
    return spiffe_id


def spiffe_id_from_der(der: bytes, *, leaf: bool = True) -> SpiffeId:
    """:func:`spiffe_id_from_certificate` of a DER certificate; AuthenticationError if it
    does not parse."""
    return spiffe_id_from_certificate(_load(x509.load_der_x509_certificate, der), leaf=leaf)


def spiffe_id_from_pem(pem: bytes | str, *, leaf: bool = True) -> SpiffeId:
    """:func:`spiffe_id_from_certificate` of a PEM certificate; AuthenticationError if it
    does not parse."""
    data = pem.encode() if isinstance(pem, str) else pem
    return spiffe_id_from_certificate(_load(x509.load_pem_x509_certificate, data), leaf=leaf)


def _load(loader: Callable[[bytes], x509.Certificate], data: bytes) -> x509.Certificate:
    try:
        return loader(data)
    except ValueError as err:
        raise AuthenticationError(f"the peer's certificate cannot be parsed: {err}") from err
