"""Node attestors: how an agent proves to the server which node it runs on.

Every node attestor has two halves. The agent half produces a payload; the
server half checks it and answers with the agent's SPIFFE ID, the node's
selectors and the aliases the agent may act for. A server half may instead
answer with a challenge, which the agent answers in a second request (x509pop
proves possession of a key this way).

    server_half = load_node_attestor_server("join_token", {}, context)
    result = server_half.attest(payload={"token": "..."}, challenge_response=None)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from spiffe import SpiffeId, TrustDomain

from attestor.selector import Selector
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.errors import ConfigError, TesseraError


class NodeAttestationError(TesseraError):
    """The evidence does not prove the node's identity; the message is safe to return."""

    status = 401


@dataclass(frozen=True)
class AttestationResult:
    agent_id: SpiffeId
    selectors: tuple[Selector, ...] = ()
    aliases: tuple[str, ...] = ()
    can_reattest: bool = False
    join_token: str | None = None
    """The single-use join token this attestation redeems. The server redeems it in the
    transaction that records the agent, so an attestation refused later (a bad CSR, a
    banned agent) leaves the token usable."""


@dataclass(frozen=True)
class Challenge:
    """A challenge the agent must answer in a second attestation request."""

    data: Mapping[str, Any] = field(default_factory=dict)


class NodeAttestorServer(Protocol):
    name: str

    def attest(
        self, payload: Mapping[str, Any], challenge_response: Mapping[str, Any] | None
    ) -> AttestationResult | Challenge: ...


@dataclass(frozen=True)
class ServerContext:
    """What the server gives its node attestors."""

    trust_domain: TrustDomain
    find_join_token: Callable[[str], str | None]
    """The alias ID of an unused, unexpired join token, which stays unused: the server
    redeems it when it records the agent. Raises CAError when the token cannot be used."""
    clock: Clock = SYSTEM_CLOCK
    """What attestors that check certificate lifetimes or expire challenges read time from."""


def load_node_attestor_server(
    name: str, config: Mapping[str, Any], context: ServerContext
) -> NodeAttestorServer:
    from attestor.node import join_token, x509pop

    factories: dict[str, Callable[[Mapping[str, Any], ServerContext], NodeAttestorServer]] = {
        "join_token": join_token.JoinTokenServer.from_config,
        "x509pop": x509pop.X509PopServer.from_config,
    }
    try:
        factory = factories[name]
    except KeyError:
        known = ", ".join(sorted(factories))
        raise ConfigError(f"unknown node attestor {name!r}; known: {known}") from None
    return factory(config, context)


def agent_id(trust_domain: TrustDomain, attestor: str, *parts: str) -> SpiffeId:
    """``spiffe://TD/tessera/agent/<attestor>/<parts...>``, the agent ID scheme."""
    return SpiffeId(f"spiffe://{trust_domain.name}/tessera/agent/{attestor}/" + "/".join(parts))
