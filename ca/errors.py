"""The server's own exceptions; the kinds every package shares live in :mod:`sdk.errors`.

    TesseraError                  (sdk.errors) root of every error Tessera raises on purpose
    ├── PermissionDenied          (sdk.errors) the caller may not do this
    │   └── AgentBanned           the calling agent is banned (wire code ``agent_banned``)
    └── CAError                   the server's own failures: a bug, a damaged database, an
                                  upstream that answered nonsense (500)

Code that means "anything Tessera raised on purpose" catches ``TesseraError``;
``CAError`` is only the server's own 500s. The shared kinds (``InvalidArgument``,
``NotFound``, ...) are imported from :mod:`sdk.errors`, never from here.
"""

from __future__ import annotations

from sdk.errors import PermissionDenied, TesseraError

__all__ = [
    "AgentBanned",
    "CAError",
]


class CAError(TesseraError):
    """The server's own failures (500): a bug, a damaged database, an upstream's nonsense."""


class AgentBanned(PermissionDenied):
    """The calling agent is banned: it may not attest or get anything until unbanned."""

    code = "agent_banned"
