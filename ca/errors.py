"""The server's exceptions.

    TesseraError                  root of every error Tessera raises on purpose
    └── CAError                   root of the server package (``ca``)
        ├── ConfigError           a flag, environment variable or config file is wrong
        ├── InvalidArgument       input that can never succeed (bad SPIFFE ID, CSR, selector)
        ├── NotFound              the named entry, agent, token or authority does not exist
        ├── AlreadyExists         a unique thing exists already
        ├── PermissionDenied      the caller may not do this
        │   └── AgentBanned       the calling agent is banned
        ├── Unauthenticated       the caller did not prove who it is
        ├── FailedPrecondition    the state does not allow it now (no prepared key, ...)
        └── Unavailable           a dependency (the database, Vault) is not answering

Each carries ``status``, the HTTP status the APIs answer with, and a message
that is safe to show to the caller; the APIs send ``code`` along, a reason
that clients may act on (``agent_banned``), where the status is not enough.
Foreign errors (SQLAlchemy, cryptography, hvac) are translated into these at
one boundary with ``raise ... from``.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Root of every error Tessera raises on purpose."""

    status = 500
    code: str | None = None
    """A reason more precise than the status, for clients to act on; None: the status's."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CAError(TesseraError):
    """Root of the server package's errors."""


class ConfigError(CAError):
    status = 400


class InvalidArgument(CAError):
    status = 400


class NotFound(CAError):
    status = 404


class AlreadyExists(CAError):
    status = 409


class PermissionDenied(CAError):
    status = 403


class AgentBanned(PermissionDenied):
    """The calling agent is banned: it may not attest or get anything until unbanned."""

    code = "agent_banned"


class Unauthenticated(CAError):
    status = 401


class FailedPrecondition(CAError):
    status = 412


class Unavailable(CAError):
    status = 503
