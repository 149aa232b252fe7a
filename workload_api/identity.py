"""What the Workload API server asks of the agent: the identities it may hand out.

The server (``workload_api.server``) only speaks the wire protocol. Everything
it serves comes from an :class:`IdentityProvider`, which the agent's SVID cache
implements: it attests a caller, says which SVIDs and bundles that caller may
see, mints JWT-SVIDs and validates them, and tells the server when anything
changed so open streams can push the new state::

    class Cache:                                  # the agent's SVID cache
        async def attest(self, peer): ...         # -> frozenset[Selector]
        def x509_context(self, selectors): ...    # -> X509Context
        ...

    server = WorkloadApiServer(Cache())

Everything here is already in wire form (DER, JWS compact, JWKS JSON) so the
server copies it into messages without parsing it again. Values are immutable:
the provider replaces them on rotation instead of changing them in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from attestor.selector import Selector
from attestor.workload import PeerCredentials

__all__ = [
    "IdentityProvider",
    "JwtSvidMaterial",
    "PeerCredentials",
    "ValidatedToken",
    "X509Context",
    "X509SvidMaterial",
]


@dataclass(frozen=True)
class X509SvidMaterial:
    """One X509-SVID and its trust domain's bundle, as the Workload API sends them."""

    spiffe_id: str
    cert_chain_der: bytes
    """Leaf first, then intermediates, concatenated DER."""
    private_key_der: bytes
    """The leaf's key as unencrypted PKCS#8 DER."""
    bundle_der: bytes
    """Concatenated DER of the CA certificates of the SVID's trust domain."""
    hint: str = ""
    """Lets a workload with several SVIDs tell them apart; empty when unset."""


@dataclass(frozen=True)
class X509Context:
    """The whole X.509 state one workload may see; the first SVID is its default.

    An empty ``svids`` means the workload has no identity.
    """

    svids: tuple[X509SvidMaterial, ...]
    federated_bundles: Mapping[str, bytes]
    """``spiffe://<trust-domain>`` -> concatenated DER CA certificates."""


@dataclass(frozen=True)
class JwtSvidMaterial:
    spiffe_id: str
    token: str
    """The JWT-SVID in JWS compact serialization."""
    hint: str = ""


@dataclass(frozen=True)
class ValidatedToken:
    """A JWT-SVID whose signature, expiry and audience were checked."""

    spiffe_id: str
    claims: dict[str, Any]


class IdentityProvider(Protocol):
    """The agent-side source of everything the Workload API serves.

    The synchronous methods are called on the server's event loop and must not
    block (read from memory). ``attest`` and ``fetch_jwt_svids`` may take time:
    attestors read ``/proc`` and may hash binaries, so ``attest`` should run
    them in a worker thread, and should guard against pid reuse (see
    ``attestor.workload.attest_with_pid_guard``).
    """

    async def attest(self, peer: PeerCredentials) -> frozenset[Selector]:
        """The caller's selectors, from the kernel's view of its process.

        Raise ``attestor.workload.WorkloadAttestationError`` (or another
        ``TesseraError``) when the caller cannot be attested; the message is
        returned to the caller.
        """
        ...

    def x509_context(self, selectors: frozenset[Selector]) -> X509Context:
        """The SVIDs of every entry these selectors match, plus federated bundles."""
        ...

    def x509_bundles(self, selectors: frozenset[Selector]) -> Mapping[str, bytes]:
        """``spiffe://<trust-domain>`` -> concatenated DER CA certificates: the own trust
        domain's, and those of the domains the caller's entries federate with."""
        ...

    def jwt_bundles(self, selectors: frozenset[Selector]) -> Mapping[str, bytes]:
        """``spiffe://<trust-domain>`` -> JWKS document, chosen as for ``x509_bundles``."""
        ...

    async def fetch_jwt_svids(
        self, selectors: frozenset[Selector], audience: Sequence[str], spiffe_id: str | None
    ) -> list[JwtSvidMaterial]:
        """JWT-SVIDs for the audience, one per matching identity (or only ``spiffe_id``'s)."""
        ...

    def validate_jwt_svid(self, token: str, audience: str) -> ValidatedToken:
        """Check a JWT-SVID against the JWT bundles.

        Raises ``sdk.errors.InvalidArgument`` saying why the token is not valid.
        """
        ...

    def version(self) -> int:
        """A number that changes whenever anything above would answer differently."""
        ...

    async def wait_for_change(self, seen_version: int) -> int:
        """Return the current version as soon as it differs from ``seen_version``."""
        ...
