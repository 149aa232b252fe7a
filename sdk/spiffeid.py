"""SPIFFE ID and trust-domain parsing with errors a user can act on.

The value types are the ``spiffe`` package's ``SpiffeId`` and ``TrustDomain``;
this module only wraps their parsing so a bad input becomes an
``InvalidArgument`` that names the input and the rule it broke.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdk.errors import InvalidArgument

if TYPE_CHECKING:  # the spiffe package (and the grpc it loads) is imported on first use,
    from spiffe import SpiffeId, TrustDomain  # so a plain CLI call starts faster

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_TRUST_DOMAIN_LENGTH",
    "parse_spiffe_id",
    "parse_trust_domain",
    "require_member",
]

MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255


def parse_spiffe_id(value: str, *, what: str = "SPIFFE ID") -> SpiffeId:
    """Parse ``spiffe://<trust-domain>/<path>``; raise InvalidArgument if malformed."""
    from spiffe import SpiffeId

    if len(value.encode()) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_ID_LENGTH} bytes")
    try:
        spiffe_id = SpiffeId(value)
        _require_lower_case(value)
    except Exception as err:  # the spiffe package raises several types here
        raise InvalidArgument(
            f"{what} {value!r} is not valid: {_reason(err)}; "
            "expected spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/web"
        ) from err
    if len(spiffe_id.trust_domain.name.encode()) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidArgument(f"{what} has a trust domain longer than 255 bytes")
    return spiffe_id


def parse_trust_domain(value: str) -> TrustDomain:
    """Parse a trust domain name (``example.org``) or its ID (``spiffe://example.org``)."""
    from spiffe import TrustDomain

    try:
        trust_domain = TrustDomain(value)
        _require_lower_case(value)
    except Exception as err:
        raise InvalidArgument(
            f"trust domain {value!r} is not valid: {_reason(err)}; "
            "use lower-case letters, digits, '.', '-' and '_', e.g. example.org"
        ) from err
    if len(trust_domain.name.encode()) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidArgument("trust domain is longer than 255 bytes")
    return trust_domain


def require_member(spiffe_id: SpiffeId, trust_domain: TrustDomain, *, what: str) -> None:
    """Raise InvalidArgument unless ``spiffe_id`` belongs to ``trust_domain``."""
    if spiffe_id.trust_domain != trust_domain:
        raise InvalidArgument(
            f"{what} {spiffe_id} is not in trust domain {trust_domain.name}; "
            f"use an ID of the form spiffe://{trust_domain.name}/..."
        )


def _require_lower_case(value: str) -> None:
    """The spiffe package folds the trust domain to lower case; the standard forbids it."""
    authority = value.removeprefix("spiffe://").split("/", 1)[0]
    if authority != authority.lower():
        raise ValueError("trust domain must be lower case")


def _reason(err: Exception) -> str:
    """Keep only the rule that was broken; the spiffe package repeats the input."""
    text = str(err).strip()
    if ": " in text and text.startswith("Invalid"):
        text = text.rsplit(": ", 1)[1]
    return text.rstrip(".") or type(err).__name__
