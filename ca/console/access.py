"""Who may use the console, and how a browser proves it.

Two ways in, and no other:

- **The one-time token** (loopback only). ``tessera server console`` prints a URL
  carrying a random token. The first request that presents it gets a session cookie
  (``HttpOnly``, ``SameSite=Strict``) and is redirected to the same page without the
  token, so it stays out of the address bar and history; the token is then spent.
  Requests must name the console's own loopback address in ``Host``, so a page on
  another site cannot reach it by rebinding a DNS name to 127.0.0.1.
- **mTLS** (any address). The TLS handshake must present an X509-SVID of the trust
  domain whose SPIFFE ID is registered as admin (an entry with ``admin``), checked again
  on every request so a withdrawn admin entry locks the caller out.

Changes (``--write``) are POST forms carrying a token bound to the session
(:meth:`Access.form_token`), so another page cannot submit them on the user's behalf.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable

COOKIE = "tessera_console"
MAX_SESSIONS = 64
"""Browsers signed in at once; the oldest session ends past this."""


class Access:
    """The console's token, its sessions and the addresses it answers to."""

    def __init__(self, *, token: str | None, hosts: Iterable[str] = ()) -> None:
        self._token = token
        self._sessions: OrderedDict[str, None] = OrderedDict()
        self._form_key = secrets.token_bytes(32)
        self.hosts = frozenset(h.lower() for h in hosts)
        """``Host`` values accepted; empty: any (mTLS, where the handshake decides)."""

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(32)

    @property
    def token_spent(self) -> bool:
        return self._token is None

    def host_allowed(self, host: str | None) -> bool:
        return not self.hosts or (host or "").lower() in self.hosts

    def exchange(self, token: str) -> str | None:
        """A new session for the one-time token, which is spent; None for anything else."""
        expected = self._token
        if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
            return None
        self._token = None
        session = secrets.token_urlsafe(32)
        self._sessions[session] = None
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def session_valid(self, session: str | None) -> bool:
        return bool(session) and session in self._sessions

    def form_token(self, session: str) -> str:
        """What a change's form must carry for ``session``."""
        return hmac.new(self._form_key, session.encode(), hashlib.sha256).hexdigest()

    def form_token_valid(self, session: str, presented: str) -> bool:
        return hmac.compare_digest(self.form_token(session), presented)


def loopback_hosts(port: int) -> list[str]:
    """The ``Host`` values a browser sends for the console on loopback ``port``."""
    return [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]


AdminCheck = Callable[[str], bool]
"""Whether a SPIFFE ID is registered as admin (mTLS mode)."""
