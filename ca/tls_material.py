"""Moved to :mod:`sdk.tls_material`; re-exported here for code written against the old path."""

from sdk.tls_material import (
    load_identity,
)

__all__ = [
    "load_identity",
]
