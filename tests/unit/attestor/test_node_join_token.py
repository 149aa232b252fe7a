"""The join_token node attestor: token shape, redemption, refusals and configuration."""

from __future__ import annotations

from typing import Any

import pytest
from spiffe import SpiffeId, TrustDomain

from attestor.node import (
    NODE_ATTESTORS_AGENT,
    AttestationResult,
    NodeAttestationError,
    ServerContext,
    load_node_attestor_server,
)
from attestor.node.join_token import (
    JoinTokenAgent,
    JoinTokenServer,
    generate_token,
    is_well_formed,
)
from attestor.plugin import PluginConfig
from sdk.errors import ConfigError, NotFound

TRUST_DOMAIN = TrustDomain("example.org")
TOKEN = "3f1c0a9e8b7d6c5f4e3d2c1b0a998877"


class FakeTokenStore:
    """Knows tokens and their aliases, as the datastore does; redeeming is the server's."""

    def __init__(self, tokens: dict[str, str | None]) -> None:
        self.tokens = dict(tokens)
        self.asked: list[str] = []

    def find(self, token: str) -> str | None:
        self.asked.append(token)
        if token not in self.tokens:
            raise NotFound("join token does not exist or was used already")
        return self.tokens[token]


def server_for(store: FakeTokenStore) -> JoinTokenServer:
    server = load_node_attestor_server("join_token", {}, ServerContext(TRUST_DOMAIN, store.find))
    assert isinstance(server, JoinTokenServer)
    return server


def test_generated_tokens_are_well_formed_and_distinct() -> None:
    tokens = {generate_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(is_well_formed(token) and len(token) == 32 for token in tokens)


@pytest.mark.parametrize(
    ("token", "well_formed"),
    [
        (TOKEN, True),
        ("a" * 16, True),
        ("A-b_c" * 20, True),
        ("a" * 128, True),
        ("a" * 15, False),
        ("a" * 129, False),
        ("", False),
        ("token with spaces!", False),
        (TOKEN + "\n", False),
        ("ééééééééééééééééé", False),
    ],
)
def test_is_well_formed(token: str, well_formed: bool) -> None:
    assert is_well_formed(token) is well_formed


def test_token_redeems_to_an_agent_with_its_alias() -> None:
    store = FakeTokenStore({TOKEN: "spiffe://example.org/node/web-1"})
    result = server_for(store).attest({"token": TOKEN}, None)

    assert result == AttestationResult(
        agent_id=SpiffeId(f"spiffe://example.org/tessera/agent/join_token/{TOKEN}"),
        selectors=(),
        aliases=("spiffe://example.org/node/web-1",),
        can_reattest=False,
        join_token=TOKEN,
    )


def test_token_without_alias_gives_no_alias() -> None:
    result = server_for(FakeTokenStore({TOKEN: None})).attest({"token": TOKEN}, None)
    assert isinstance(result, AttestationResult)
    assert result.aliases == ()


def test_the_attestor_leaves_the_token_for_the_server_to_redeem() -> None:
    """Only the transaction that records the agent uses the token up (see ca.api.node)."""
    store = FakeTokenStore({TOKEN: None})
    server = server_for(store)
    server.attest({"token": TOKEN}, None)
    server.attest({"token": TOKEN}, None)
    assert store.tokens == {TOKEN: None}


def test_an_unknown_or_used_token_is_refused_with_the_stores_reason() -> None:
    server = server_for(FakeTokenStore({}))

    with pytest.raises(NodeAttestationError) as caught:
        server.attest({"token": TOKEN}, None)

    assert caught.value.status == 401
    assert caught.value.message == (
        "join token was refused: join token does not exist or was used already; "
        "generate a new one with 'tessera server token generate'"
    )
    assert isinstance(caught.value.__cause__, NotFound)


@pytest.mark.parametrize(
    "payload", [{}, {"token": None}, {"token": 42}, {"token": "short"}, {"token": "a b" * 10}]
)
def test_missing_or_malformed_token_is_refused_without_asking_the_store(
    payload: dict[str, Any],
) -> None:
    store = FakeTokenStore({TOKEN: None})
    with pytest.raises(NodeAttestationError) as caught:
        server_for(store).attest(payload, None)
    assert caught.value.message == "join token is missing or malformed"
    assert store.asked == []


def test_server_half_takes_no_settings() -> None:
    context = ServerContext(TRUST_DOMAIN, FakeTokenStore({}).find)
    with pytest.raises(ConfigError) as caught:
        load_node_attestor_server("join_token", {"ttl": 600, "alias": "x"}, context)
    assert caught.value.message == (
        "[node_attestors.join_token] ttl: unknown setting; alias: unknown setting; "
        "it takes no settings"
    )


def test_agent_half_sends_its_token() -> None:
    agent = JoinTokenAgent(TOKEN)
    assert agent.name == "join_token"
    assert agent.payload() == {"token": TOKEN}


def test_agent_half_refuses_a_malformed_token() -> None:
    with pytest.raises(ConfigError) as caught:
        JoinTokenAgent("not a token")
    assert caught.value.message == (
        "join token is malformed; copy it exactly as 'tessera server token generate' printed it"
    )


def test_agent_half_has_no_challenge_to_answer() -> None:
    with pytest.raises(NodeAttestationError) as caught:
        JoinTokenAgent(TOKEN).answer({"nonce": "AAAA"})
    assert caught.value.message == "join_token attestation has no challenge"


def test_the_agent_half_is_built_from_its_flags_through_the_registry() -> None:
    agent = NODE_ATTESTORS_AGENT.load(PluginConfig("join_token", {"token": TOKEN}), None)

    assert isinstance(agent, JoinTokenAgent)
    assert agent.payload() == {"token": TOKEN}
    assert NODE_ATTESTORS_AGENT.names() == ("join_token", "x509pop")
