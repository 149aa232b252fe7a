"""The SDK's exceptions.

    TesseraError                  root of every error Tessera raises on purpose (ca.errors)
    └── SdkError                  root of the SDK package (``sdk``)
        ├── SourceError           a source cannot deliver an SVID or a bundle
        ├── PolicyError           a policy file (or dict) is malformed
        ├── AuthenticationError   the peer did not prove a SPIFFE ID (no X509-SVID, bad JWT-SVID)
        └── AuthorizationError    the peer proved its SPIFFE ID, and a rule refused it

Each carries ``status`` (the HTTP status an integration answers with) and a
``message`` safe to show the peer. Errors of the ``spiffe`` package and of
``ssl`` are translated into these where they are caught, with ``raise ... from``;
in the other direction, a TLS handshake refused by an authorizer fails with
``ssl.SSLCertVerificationError`` whose ``__cause__`` is the SDK error::

    try:
        sock = context.wrap_socket(raw, server_hostname="api")
    except ssl.SSLCertVerificationError as err:
        if isinstance(err.__cause__, AuthorizationError):
            print(err.__cause__.peer_id, err.__cause__.rule)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ca.errors import TesseraError

if TYPE_CHECKING:
    from spiffe import SpiffeId

__all__ = [
    "AuthenticationError",
    "AuthorizationError",
    "PolicyError",
    "SdkError",
    "SourceError",
]


class SdkError(TesseraError):
    """Root of the SDK's errors."""


class SourceError(SdkError):
    """A source cannot deliver: the Workload API is unreachable, files are missing or bad."""

    status = 503


class PolicyError(SdkError):
    """A policy is malformed; the message names the file, the rule and what is wrong."""

    status = 500

    def __init__(self, message: str, *, source: str | Path, rule: str | None = None) -> None:
        where = f"{source}: {rule}: " if rule else f"{source}: "
        super().__init__(where + message)
        self.source = str(source)
        self.rule = rule


class AuthenticationError(SdkError):
    """The peer did not prove a SPIFFE ID: no X509-SVID, a chain from the wrong trust
    domain, or a JWT-SVID that is missing, expired, forged or for another audience."""

    status = 401

    def __init__(self, message: str, *, peer_id: SpiffeId | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class AuthorizationError(SdkError):
    """The peer proved ``peer_id``, and ``rule`` refused it for ``reason``."""

    status = 403

    def __init__(self, peer_id: SpiffeId, rule: str, reason: str) -> None:
        super().__init__(f"{peer_id} refused by {rule}: {reason}")
        self.peer_id = peer_id
        self.rule = rule
        self.reason = reason
