"""Node attestors: how an agent proves to the server which node it runs on.

Every node attestor has two halves. The agent half produces a payload; the
server half checks it and answers with the agent's SPIFFE ID, the node's
selectors and the aliases the agent may act for. A server half may instead
answer with a challenge, which the agent answers in a second request (x509pop
proves possession of a key this way).

    server_half = NODE_ATTESTORS_SERVER.load(PluginConfig("join_token"), context)
    result = server_half.attest(payload={"token": "..."}, challenge_response=None)

    agent_half = NODE_ATTESTORS_AGENT.load(PluginConfig("join_token", {"token": "..."}), None)
    agent_half.payload()                     # {"token": "..."}

Both halves of an attestor live in one module, which exports ``SERVER_PLUGIN``
and ``AGENT_PLUGIN`` (see :mod:`attestor.plugin`). The server half's settings
are its ``[node_attestors.<name>]`` table; the agent half's come from the
agent's flags (``--join-token``, ``--x509pop-cert`` and ``--x509pop-key``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from attestor.plugin import PluginConfig, Registry
from attestor.selector import Selector
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.errors import TesseraError
from sdk.spiffeid import SpiffeId, TrustDomain

__all__ = [
    "NODE_ATTESTORS_AGENT",
    "NODE_ATTESTORS_SERVER",
    "AttestationResult",
    "Challenge",
    "NodeAttestationError",
    "NodeAttestorAgent",
    "NodeAttestorServer",
    "ServerContext",
    "agent_id",
    "load_node_attestor_server",
]



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
    """The server half of a node attestor."""

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


class NodeAttestorAgent(Protocol):
    """The agent half of a node attestor."""

    name: str
    """The attestation type the server half is registered under, e.g. ``join_token``."""

    def payload(self) -> Mapping[str, Any]:
        """The evidence sent with the first attestation request."""
        ...

    def answer(self, challenge: Mapping[str, Any]) -> Mapping[str, Any]:
        """The response to a challenge of the server half."""
        ...


_NODE_ATTESTOR_MODULES = {
    "join_token": "attestor.node.join_token",
    "x509pop": "attestor.node.x509pop",
}

NODE_ATTESTORS_SERVER: Registry[ServerContext, NodeAttestorServer] = Registry(
    "node attestor", "node_attestors", _NODE_ATTESTOR_MODULES, attribute="SERVER_PLUGIN"
)
"""The server halves, configured by ``[node_attestors.<name>]`` tables."""

NODE_ATTESTORS_AGENT: Registry[None, NodeAttestorAgent] = Registry(
    "node attestor", "node_attestors", _NODE_ATTESTOR_MODULES, attribute="AGENT_PLUGIN"
)
"""The agent halves, configured by the agent's flags; they need no context."""


def load_node_attestor_server(
    name: str, config: Mapping[str, Any], context: ServerContext
) -> NodeAttestorServer:
    """The server half named in ``[node_attestors.<name>]``, built from its settings."""
    return NODE_ATTESTORS_SERVER.load(PluginConfig(name, config), context)


def agent_id(trust_domain: TrustDomain, attestor: str, *parts: str) -> SpiffeId:
    """``spiffe://TD/tessera/agent/<attestor>/<parts...>``, the agent ID scheme."""
    return SpiffeId(f"spiffe://{trust_domain.name}/tessera/agent/{attestor}/" + "/".join(parts))
