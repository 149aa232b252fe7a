"""Fetching a federated trust domain's bundle from its bundle endpoint.

    data = await fetch_bundle(relationship, stored_bundle)   # the SPIFFE bundle document

How the endpoint is authenticated depends on the relationship's profile:

- ``https_web``: its certificate must verify against the system's trusted CAs
  (``ssl.create_default_context()``, which honours ``SSL_CERT_FILE`` and
  ``SSL_CERT_DIR``) and name the URL's host.
- ``https_spiffe``: its certificate chain must verify against the *stored*
  bundle of that trust domain, and its one URI SAN must be the relationship's
  endpoint SPIFFE ID. The host name is not checked: the SPIFFE ID is what
  identifies the endpoint.

Every failure is a :class:`BundleFetchError` whose message says what went
wrong and what to do; the network and TLS libraries' errors stop here.

httpx is imported on the first fetch, not with the module: a server without
federation relationships never needs it, and it costs about 40 ms at start.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Protocol, TypeVar

from cryptography import x509

from ca.datastore.records import HTTPS_SPIFFE, FederationRelationship
from sdk.bundle import MAX_BUNDLE_BYTES, TrustBundle
from sdk.errors import Unavailable
from sdk.peer import uri_sans

if TYPE_CHECKING:
    import httpx

FETCH_TIMEOUT_SECONDS = 10.0

E = TypeVar("E", bound=BaseException)


class BundleFetchError(Unavailable):
    """The bundle endpoint could not be reached, authenticated or read."""


class BundleFetcher(Protocol):
    """Fetches the raw bundle document of ``relationship``; ``stored`` is the bundle
    of that trust domain held now (what an ``https_spiffe`` endpoint must chain to)."""

    async def __call__(
        self, relationship: FederationRelationship, stored: TrustBundle | None
    ) -> bytes: ...


async def fetch_bundle(
    relationship: FederationRelationship,
    stored: TrustBundle | None,
    *,
    timeout: float = FETCH_TIMEOUT_SECONDS,
) -> bytes:
    """GET the relationship's bundle endpoint; BundleFetchError on any failure."""
    import httpx

    url = relationship.bundle_endpoint_url
    context = _client_context(relationship, stored)
    try:
        async with (
            httpx.AsyncClient(verify=context, timeout=timeout) as client,
            client.stream("GET", url, headers={"Accept": "application/json"}) as response,
        ):
            if relationship.profile == HTTPS_SPIFFE:
                _check_endpoint_id(relationship, response)
            if response.status_code != 200:
                raise BundleFetchError(
                    f"the bundle endpoint {url} answered HTTP {response.status_code}; check "
                    "the URL (it must be where the bundle document itself is served)"
                )
            return await _read_limited(url, response)
    except httpx.HTTPError as err:
        raise _explain(relationship, err) from err


def _client_context(
    relationship: FederationRelationship, stored: TrustBundle | None
) -> ssl.SSLContext:
    if relationship.profile != HTTPS_SPIFFE:
        return ssl.create_default_context()
    name = relationship.trust_domain
    if stored is None or not stored.x509_authorities:
        raise BundleFetchError(
            f"no X.509 bundle of {name} is stored to authenticate its https_spiffe endpoint "
            f"with; give one with 'tessera server federation update --trust-domain {name} "
            "--trust-domain-bundle-path FILE'"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the endpoint is identified by its SPIFFE ID instead
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=stored.to_pem().decode())
    return context


def _check_endpoint_id(relationship: FederationRelationship, response: httpx.Response) -> None:
    """The verified peer certificate must carry exactly the endpoint SPIFFE ID."""
    url = relationship.bundle_endpoint_url
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise BundleFetchError(f"the bundle endpoint {url} presented no certificate")
    uris = uri_sans(x509.load_der_x509_certificate(der))
    expected = relationship.endpoint_spiffe_id
    if uris != [expected]:
        presented = ", ".join(uris) or "no SPIFFE ID"
        raise BundleFetchError(
            f"the bundle endpoint {url} presented {presented}, not the expected endpoint "
            f"SPIFFE ID {expected}; check --endpoint-spiffe-id (or the URL)"
        )


async def _read_limited(url: str, response: httpx.Response) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_BUNDLE_BYTES:
            raise BundleFetchError(
                f"the bundle endpoint {url} sent more than {MAX_BUNDLE_BYTES} bytes; "
                "that is not a trust bundle"
            )
    return bytes(body)


def _explain(relationship: FederationRelationship, err: httpx.HTTPError) -> BundleFetchError:
    import httpx

    url = relationship.bundle_endpoint_url
    verification = _cause(err, ssl.SSLCertVerificationError)
    if verification is not None:
        reason = getattr(verification, "verify_message", "") or str(verification)
        if relationship.profile == HTTPS_SPIFFE:
            return BundleFetchError(
                f"the bundle endpoint {url} presented a certificate that does not verify "
                f"against the stored bundle of {relationship.trust_domain} ({reason}); if "
                "its keys changed while refreshes were failing, give its current bundle with "
                "'tessera server federation update --trust-domain-bundle-path FILE'"
            )
        return BundleFetchError(
            f"the bundle endpoint {url} presented a certificate that the system's trusted "
            f"CAs do not verify for its host ({reason}); https_web needs a web PKI "
            "certificate for the URL's host (a private CA can be trusted with SSL_CERT_FILE)"
        )
    if isinstance(err, httpx.TimeoutException):
        return BundleFetchError(f"the bundle endpoint {url} did not answer in time; is it up?")
    if isinstance(err, httpx.ConnectError | httpx.NetworkError):
        reason = str(err) or type(err).__name__
        return BundleFetchError(
            f"cannot reach the bundle endpoint {url} ({reason}); check the URL and that "
            "the endpoint is serving"
        )
    return BundleFetchError(f"fetching the bundle from {url} failed: {err}")


def _cause(err: BaseException, kind: type[E]) -> E | None:
    """The first exception of ``kind`` in the chain of causes of ``err``."""
    seen: BaseException | None = err
    for _ in range(16):
        if seen is None:
            break
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
