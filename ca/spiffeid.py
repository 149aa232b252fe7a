"""Moved to :mod:`sdk.spiffeid`; this module re-exports it for code written against the old path."""

from sdk.spiffeid import (
    MAX_ID_LENGTH,
    MAX_TRUST_DOMAIN_LENGTH,
    parse_spiffe_id,
    parse_trust_domain,
    require_member,
)

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_TRUST_DOMAIN_LENGTH",
    "parse_spiffe_id",
    "parse_trust_domain",
    "require_member",
]
