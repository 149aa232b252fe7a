"""Moved to :mod:`sdk.bundle`; this module re-exports it for code written against the old path."""

from sdk.bundle import (
    DEFAULT_REFRESH_HINT,
    JWT_SVID_USE,
    MAX_BUNDLE_BYTES,
    X509_SVID_USE,
    TrustBundle,
)

__all__ = [
    "DEFAULT_REFRESH_HINT",
    "JWT_SVID_USE",
    "MAX_BUNDLE_BYTES",
    "X509_SVID_USE",
    "TrustBundle",
]
