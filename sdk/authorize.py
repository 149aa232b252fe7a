"""Authorizers: small callables that allow a peer's SPIFFE ID or raise saying why not.

An authorizer takes the SPIFFE ID a peer proved (in the TLS handshake, or with
a JWT-SVID) and returns None to allow it, or raises
:class:`~sdk.errors.AuthorizationError`, which names the peer, the rule and
the reason::

    authorizer = authorize_member_of("example.org")
    authorizer(SpiffeId("spiffe://partner.org/web"))
    # AuthorizationError: spiffe://partner.org/web refused by authorize_member_of:
    #   expected a member of trust domain example.org

They compose (:func:`authorize_all`) and are what :mod:`sdk.tls` runs during
the handshake. A custom authorizer is any function of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

from sdk.errors import AuthorizationError, InvalidArgument, SdkError
from sdk.policy import Policy
from sdk.spiffeid import SpiffeId, TrustDomain, parse_spiffe_id, parse_trust_domain

__all__ = [
    "Authorizer",
    "authorize_all",
    "authorize_any",
    "authorize_id",
    "authorize_member_of",
    "authorize_one_of",
    "authorize_policy",
]

Authorizer = Callable[[SpiffeId], None]
"""Allows a peer by returning, refuses it by raising AuthorizationError."""


def authorize_any() -> Authorizer:
    """Allow every peer whose certificate chains to a trusted bundle."""

    def authorize(peer_id: SpiffeId) -> None:
        return None

    return authorize


def authorize_id(expected: SpiffeId | str) -> Authorizer:
    """Allow exactly ``expected``."""
    wanted = _spiffe_id(expected)

    def authorize(peer_id: SpiffeId) -> None:
        if peer_id != wanted:
            raise AuthorizationError(peer_id, "authorize_id", f"expected {wanted}")

    return authorize


def authorize_one_of(*allowed: SpiffeId | str) -> Authorizer:
    """Allow any of the given IDs."""
    if not allowed:
        raise SdkError("authorize_one_of needs at least one SPIFFE ID")
    wanted = frozenset(_spiffe_id(value) for value in allowed)
    listed = ", ".join(sorted(str(i) for i in wanted))

    def authorize(peer_id: SpiffeId) -> None:
        if peer_id not in wanted:
            raise AuthorizationError(peer_id, "authorize_one_of", f"expected one of {listed}")

    return authorize


def authorize_member_of(trust_domain: TrustDomain | str) -> Authorizer:
    """Allow any ID of ``trust_domain``."""
    if isinstance(trust_domain, TrustDomain):
        wanted = trust_domain
    else:
        try:
            wanted = parse_trust_domain(trust_domain)
        except InvalidArgument as err:
            raise SdkError(err.message) from err

    def authorize(peer_id: SpiffeId) -> None:
        if peer_id.trust_domain != wanted:
            raise AuthorizationError(
                peer_id, "authorize_member_of", f"expected a member of trust domain {wanted.name}"
            )

    return authorize


def authorize_all(*authorizers: Authorizer) -> Authorizer:
    """Allow a peer only if every authorizer does; the first refusal is raised."""

    def authorize(peer_id: SpiffeId) -> None:
        for authorizer in authorizers:
            authorizer(peer_id)

    return authorize


def authorize_policy(
    policy: Policy, method: str | None = None, path: str | None = None
) -> Authorizer:
    """Ask ``policy`` (for ``method``/``path``, if given); refuse with the deciding rule.

    At the TLS handshake there is no request yet: rules that name methods or
    paths do not match then (see :mod:`sdk.policy`).
    """

    def authorize(peer_id: SpiffeId) -> None:
        decision = policy.decide(peer_id, method=method, path=path)
        if not decision.allowed:
            raise AuthorizationError(peer_id, f"policy rule {decision.rule!r}", decision.reason)

    return authorize


def _spiffe_id(value: SpiffeId | str) -> SpiffeId:
    if isinstance(value, SpiffeId):
        return value
    try:
        return parse_spiffe_id(value)
    except InvalidArgument as err:
        raise SdkError(err.message) from err
