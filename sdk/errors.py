"""Tessera's exceptions: the root, the kinds every package raises, and the SDK's own.

    TesseraError                  root of every error Tessera raises on purpose
    ├── ConfigError               a flag, environment variable or config file is wrong
    ├── InvalidArgument           input that can never succeed (bad SPIFFE ID, CSR, selector)
    ├── NotFound                  the named entry, agent, token or authority does not exist
    ├── AlreadyExists             a unique thing exists already
    ├── PermissionDenied          the caller may not do this
    ├── Unauthenticated           the caller did not prove who it is
    ├── FailedPrecondition        the state does not allow it now (no prepared key, ...)
    ├── Unavailable               a dependency (the database, Vault, the server) is not answering
    ├── SdkError                  root of the SDK's own errors
    │   ├── SourceError           a source cannot deliver an SVID or a bundle
    │   ├── PolicyError           a policy file (or dict) is malformed
    │   ├── AuthenticationError   the peer did not prove a SPIFFE ID (no X509-SVID, bad JWT-SVID)
    │   │   └── NotAnX509Svid     a certificate is not shaped like an X509-SVID leaf
    │   └── AuthorizationError    the peer proved its SPIFFE ID, and a rule refused it
    └── CAError                   the server's own failures (:mod:`ca.errors`, with AgentBanned)

Each carries ``status`` (the HTTP status an API or integration answers with) and a
``message`` safe to show the caller or peer; the server's APIs send ``code`` along, a
reason that clients may act on (``agent_banned``), where the status is not enough.
Foreign errors (SQLAlchemy, cryptography, hvac, the ``spiffe`` package, ``ssl``) are
translated into these where they are caught, with ``raise ... from``; in the other
direction, a TLS handshake refused by an authorizer fails with
``ssl.SSLCertVerificationError`` whose ``__cause__`` is the SDK error::

    try:
        sock = context.wrap_socket(raw, server_hostname="api")
    except ssl.SSLCertVerificationError as err:
        if isinstance(err.__cause__, AuthorizationError):
            print(err.__cause__.peer_id, err.__cause__.rule)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from spiffe import SpiffeId

__all__ = [
    "AlreadyExists",
    "AuthenticationError",
    "AuthorizationError",
    "ConfigError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotAnX509Svid",
    "NotFound",
    "PermissionDenied",
    "PolicyError",
    "SdkError",
    "SourceError",
    "SvidProblem",
    "TesseraError",
    "Unauthenticated",
    "Unavailable",
]


class TesseraError(Exception):
    """Root of every error Tessera raises on purpose."""

    status = 500
    code: str | None = None
    """A reason more precise than the status, for clients to act on; None: the status's."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(TesseraError):
    status = 400


class InvalidArgument(TesseraError):
    status = 400


class NotFound(TesseraError):
    status = 404


class AlreadyExists(TesseraError):
    status = 409


class PermissionDenied(TesseraError):
    status = 403


class Unauthenticated(TesseraError):
    status = 401


class FailedPrecondition(TesseraError):
    status = 412


class Unavailable(TesseraError):
    status = 503


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


SvidProblem = Literal["uri_sans", "spiffe_id", "path", "ca"]
"""Which rule of an X509-SVID leaf a certificate breaks: not exactly one URI SAN; a URI
SAN that is not a SPIFFE ID; an ID without a path; a CA certificate."""


class NotAnX509Svid(AuthenticationError):
    """A certificate is not shaped like an X509-SVID leaf.

    ``problem`` says which rule it breaks and ``uri_sans`` what it carries, so that a
    caller with its own wording can catch this and raise its own error; ``peer_id`` is
    the ID it names when that much is valid (problems ``path`` and ``ca``).
    """

    def __init__(
        self,
        message: str,
        *,
        problem: SvidProblem,
        uri_sans: list[str],
        peer_id: SpiffeId | None = None,
    ) -> None:
        super().__init__(message, peer_id=peer_id)
        self.problem: SvidProblem = problem
        self.uri_sans = uri_sans


class AuthorizationError(SdkError):
    """The peer proved ``peer_id``, and ``rule`` refused it for ``reason``."""

    status = 403

    def __init__(self, peer_id: SpiffeId, rule: str, reason: str) -> None:
        super().__init__(f"{peer_id} refused by {rule}: {reason}")
        self.peer_id = peer_id
        self.rule = rule
        self.reason = reason
