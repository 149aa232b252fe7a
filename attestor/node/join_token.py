"""The ``join_token`` node attestor: a single-use secret made by an operator.

    tessera server token generate --spiffe-id spiffe://example.org/node/web-1
    tessera agent run ... --join-token <token>

The agent's ID is ``spiffe://TD/tessera/agent/join_token/<token>``; the token's
``--spiffe-id`` becomes an alias of that agent. A token works once and expires
(600 s by default); a join-token agent whose SVID lapsed needs a new token.

The server half only checks the token: the server redeems it in the same
transaction that records the agent, once the CSR and everything else passed,
so a refused attestation does not spend it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any

from attestor.node import (
    AttestationResult,
    Challenge,
    NodeAttestationError,
    ServerContext,
    agent_id,
)
from attestor.plugin import Plugin
from attestor.settings import NoSettings, Settings
from sdk.errors import ConfigError, TesseraError

__all__ = [
    "AGENT_PLUGIN",
    "SERVER_PLUGIN",
    "JoinTokenAgent",
    "JoinTokenAgentSettings",
    "JoinTokenServer",
    "generate_token",
    "is_well_formed",
]

NAME = "join_token"
_TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


def generate_token() -> str:
    """A new random join token (128 bits, URL-safe)."""
    return secrets.token_hex(16)


def is_well_formed(token: str) -> bool:
    return bool(_TOKEN_PATTERN.fullmatch(token))


class JoinTokenServer:
    name = NAME

    def __init__(self, context: ServerContext) -> None:
        self._context = context

    def attest(
        self, payload: Mapping[str, Any], challenge_response: Mapping[str, Any] | None
    ) -> AttestationResult | Challenge:
        token = payload.get("token")
        if not isinstance(token, str) or not is_well_formed(token):
            raise NodeAttestationError("join token is missing or malformed")
        try:
            alias = self._context.find_join_token(token)
        except TesseraError as err:
            hint = "generate a new one with 'tessera server token generate'"
            reason = err.message if hint in err.message else f"{err.message}; {hint}"
            raise NodeAttestationError(f"join token was refused: {reason}") from err
        return AttestationResult(
            agent_id=agent_id(self._context.trust_domain, NAME, token),
            aliases=(alias,) if alias else (),
            can_reattest=False,
            join_token=token,
        )


class JoinTokenAgent:
    """The agent half: sends the token it was given."""

    name = NAME

    def __init__(self, token: str) -> None:
        if not is_well_formed(token):
            raise ConfigError(
                "join token is malformed; copy it exactly as 'tessera server token generate' "
                "printed it"
            )
        self._token = token

    def payload(self) -> dict[str, Any]:
        return {"token": self._token}

    def answer(self, challenge: Mapping[str, Any]) -> dict[str, Any]:
        raise NodeAttestationError("join_token attestation has no challenge")


class JoinTokenAgentSettings(Settings):
    """The agent half's settings, from ``--join-token``."""

    token: str


def _build_server(settings: NoSettings, context: ServerContext) -> JoinTokenServer:
    return JoinTokenServer(context)


def _build_agent(settings: JoinTokenAgentSettings, context: None) -> JoinTokenAgent:
    return JoinTokenAgent(settings.token)


SERVER_PLUGIN = Plugin(NAME, NoSettings, _build_server)
AGENT_PLUGIN = Plugin(NAME, JoinTokenAgentSettings, _build_agent)
