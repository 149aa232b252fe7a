"""The server's own exceptions; the kinds every package shares live in :mod:`sdk.errors`.

    TesseraError                  (sdk.errors) root of every error Tessera raises on purpose
    ├── PermissionDenied          (sdk.errors) the caller may not do this
    │   └── AgentBanned           the calling agent is banned (wire code ``agent_banned``)
    └── CAError                   the server's own failures: a bug, a damaged database, an
                                  upstream that answered nonsense (500)

Code that means "anything Tessera raised on purpose" catches ``TesseraError``;
``CAError`` is only the server's own 500s. ``ConfigError``, ``InvalidArgument``,
``NotFound``, ``AlreadyExists``, ``PermissionDenied``, ``Unauthenticated``,
``FailedPrecondition``, ``Unavailable`` and ``TesseraError`` are re-exported from
:mod:`sdk.errors` for code written against this module.
"""

from __future__ import annotations

from sdk.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TesseraError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AgentBanned",
    "AlreadyExists",
    "CAError",
    "ConfigError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "TesseraError",
    "Unauthenticated",
    "Unavailable",
]


class CAError(TesseraError):
    """The server's own failures (500): a bug, a damaged database, an upstream's nonsense."""


class AgentBanned(PermissionDenied):
    """The calling agent is banned: it may not attest or get anything until unbanned."""

    code = "agent_banned"
