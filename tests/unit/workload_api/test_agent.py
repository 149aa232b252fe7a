"""The agent as IdentityProvider, against a fake node API and a manual clock."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from spiffe import SpiffeId

from attestor.selector import parse_selectors
from sdk.clock import ManualClock
from sdk.errors import ConfigError, InvalidArgument, Unavailable
from tests.support.pki import write_key_pem, write_pem
from tests.unit.workload_api.agent_helpers import (
    AuthorityForTests,
    FakeNodeApi,
    agent_identity_files,
    entry,
)
from workload_api import storage as storage_module
from workload_api.agent import Agent, AgentSvidExpired
from workload_api.config import AgentConfig, agent_config
from workload_api.storage import AgentIdentity, AgentStorage

NOW = datetime.now(UTC).replace(microsecond=0)
TOKEN = "0123456789abcdef0123"
WEB = entry("e-web", "spiffe://example.org/web", "unix:uid:1000", created_at=1)
DB = entry("e-db", "spiffe://example.org/db", "unix:uid:2000", created_at=2,
           federates_with=["partner.test"])
UID_1000 = parse_selectors(["unix:uid:1000", "unix:gid:1000"])


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def authority() -> AuthorityForTests:
    return AuthorityForTests("example.org", NOW)


@pytest.fixture
def api(authority: AuthorityForTests, clock: ManualClock) -> FakeNodeApi:
    return FakeNodeApi(authority=authority, clock=clock, registered={WEB.id: WEB, DB.id: DB})


def config(tmp_path: Path, **values: Any) -> AgentConfig:
    base = {"trust_domain": "example.org", "server": ["127.0.0.1:1"],
            "data_dir": str(tmp_path / "agent"), "health_bind": "0"}
    base.update(values)
    return agent_config(base, environ={})


def attested_before(tmp_path: Path, authority: AuthorityForTests, when: datetime) -> None:
    """Leave what an agent that attested at ``when`` leaves in its data dir."""
    leaf, key = agent_identity_files(authority, when, TOKEN)
    storage = AgentStorage(tmp_path / "agent")
    storage.prepare()
    storage.save_identity(AgentIdentity(
        spiffe_id=SpiffeId(f"spiffe://example.org/tessera/agent/join_token/{TOKEN}"),
        chain=(leaf,), private_key=key, attestation_type="join_token", reattestable=False,
    ))
    storage.save_bundle(authority.bundle)


def new_agent(
    tmp_path: Path, api: FakeNodeApi, clock: ManualClock, **values: Any
) -> tuple[Agent, list[str]]:
    lines: list[str] = []
    agent = Agent(config(tmp_path, **values), clock=clock, rng=random.Random(1),
                  progress=lines.append, workload_attestors=[], node_client=api)  # type: ignore[arg-type]
    return agent, lines


def test_a_restarted_agent_uses_its_stored_svid_and_syncs(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    attested_before(tmp_path, authority, NOW)
    agent, lines = new_agent(tmp_path, api, clock)
    asyncio.run(agent.start())
    assert lines[0].startswith(
        f"Loaded the agent SVID of spiffe://example.org/tessera/agent/join_token/{TOKEN} from "
    )
    assert lines[-1] == "Synced 2 entries (2 X509-SVIDs)"
    assert api.calls == ["configure", "entries", "bundles", "sign_x509"]
    context = agent.x509_context(UID_1000)
    assert [s.spiffe_id for s in context.svids] == ["spiffe://example.org/web"]
    assert context.svids[0].bundle_der == authority.bundle.x509_der()
    assert agent.ready_problem() is None


def test_rotation_happens_when_due_and_bumps_the_version(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    attested_before(tmp_path, authority, NOW)
    agent, _ = new_agent(tmp_path, api, clock)

    async def scenario() -> None:
        await agent.start()
        first = agent.x509_context(UID_1000).svids[0]
        version = agent.version()
        await agent.sync_once(wait=0)
        assert api.calls.count("sign_x509") == 1, "nothing was due yet"
        due = agent.cache.next_rotation()
        assert due is not None
        clock.set(due)
        await agent.sync_once(wait=0)
        assert api.calls.count("sign_x509") == 2
        assert agent.version() > version
        assert agent.x509_context(UID_1000).svids[0].cert_chain_der != first.cert_chain_der

    asyncio.run(scenario())


def test_one_refused_entry_does_not_keep_the_others_from_their_svids(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    attested_before(tmp_path, authority, NOW)
    api.refuse_entries = {DB.id}
    agent, _ = new_agent(tmp_path, api, clock)
    asyncio.run(agent.start())
    assert agent.cache.svid_for(WEB.id) is not None
    assert agent.cache.svid_for(DB.id) is None


def test_a_deleted_entry_disappears(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    attested_before(tmp_path, authority, NOW)
    agent, _ = new_agent(tmp_path, api, clock)

    async def scenario() -> None:
        await agent.start()
        del api.registered[WEB.id]
        api.revision += 1
        await agent.sync_once(wait=0)

    asyncio.run(scenario())
    assert agent.x509_context(UID_1000).svids == ()


def test_jwt_svids_are_cached_per_identity_and_audience_set(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    attested_before(tmp_path, authority, NOW)
    agent, _ = new_agent(tmp_path, api, clock)

    async def scenario() -> None:
        await agent.start()
        first = await agent.fetch_jwt_svids(UID_1000, ["db", "cache"], None)
        again = await agent.fetch_jwt_svids(UID_1000, ["cache", "db"], None)
        assert [s.token for s in again] == [s.token for s in first]
        assert api.calls.count("sign_jwt") == 1
        await agent.fetch_jwt_svids(UID_1000, ["db"], None)
        assert api.calls.count("sign_jwt") == 2

        clock.advance(timedelta(minutes=2, seconds=30))  # half of the 5 minutes
        renewed = await agent.fetch_jwt_svids(UID_1000, ["db", "cache"], None)
        assert api.calls.count("sign_jwt") == 3
        assert renewed[0].token != first[0].token

        api.unavailable = True
        clock.advance(timedelta(minutes=3))
        kept = await agent.fetch_jwt_svids(UID_1000, ["db", "cache"], None)
        assert kept[0].token == renewed[0].token, "a cached, unexpired token is served offline"
        with pytest.raises(Unavailable) as caught:
            await agent.fetch_jwt_svids(UID_1000, ["other"], None)
        assert caught.value.message == (
            "no Tessera server answered to mint a JWT-SVID for spiffe://example.org/web; "
            "try again shortly"
        )

    asyncio.run(scenario())


def test_validate_jwt_svid_against_own_and_federated_bundles(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    partner = AuthorityForTests("partner.test", NOW)
    stranger = AuthorityForTests("stranger.test", NOW)
    api.federated = {"partner.test": partner.bundle}
    attested_before(tmp_path, authority, NOW)
    agent, _ = new_agent(tmp_path, api, clock)
    asyncio.run(agent.start())

    token = authority.jwt("spiffe://example.org/web", ["db"], NOW)
    validated = agent.validate_jwt_svid(token, "db")
    assert validated.spiffe_id == "spiffe://example.org/web"
    assert validated.claims["aud"] == "db"
    with pytest.raises(InvalidArgument) as caught:
        agent.validate_jwt_svid(token, "other")
    assert caught.value.message == "JWT-SVID audience ['db'] does not include 'other'"

    partner_token = partner.jwt("spiffe://partner.test/api", ["db"], NOW)
    assert agent.validate_jwt_svid(partner_token, "db").spiffe_id == "spiffe://partner.test/api"
    with pytest.raises(InvalidArgument) as caught:
        agent.validate_jwt_svid(stranger.jwt("spiffe://stranger.test/x", ["db"], NOW), "db")
    assert caught.value.message == (
        "no JWT bundle for trust domain stranger.test; the agent can validate JWT-SVIDs of its "
        "own trust domain and of federated ones"
    )
    forged = partner.jwt("spiffe://example.org/web", ["db"], NOW)
    with pytest.raises(InvalidArgument):
        agent.validate_jwt_svid(forged, "db")


def test_federated_bundles_reach_only_federating_workloads(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    partner = AuthorityForTests("partner.test", NOW)
    api.federated = {"partner.test": partner.bundle}
    attested_before(tmp_path, authority, NOW)
    agent, _ = new_agent(tmp_path, api, clock)
    asyncio.run(agent.start())
    uid_2000 = parse_selectors(["unix:uid:2000"])
    assert dict(agent.x509_context(uid_2000).federated_bundles) == {
        "spiffe://partner.test": partner.bundle.x509_der()
    }
    assert agent.x509_context(UID_1000).federated_bundles == {}


def test_an_expired_join_token_agent_asks_for_a_new_token(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    attested_before(tmp_path, authority, NOW)
    clock.advance(timedelta(hours=2))
    agent, _ = new_agent(tmp_path, api, clock, join_token=TOKEN)
    with pytest.raises(AgentSvidExpired) as caught:
        asyncio.run(agent.start())
    stored = AgentStorage(tmp_path / "agent").load_identity(agent.config.trust_domain)
    assert stored is not None
    assert caught.value.message == (
        f"the agent's SVID (spiffe://example.org/tessera/agent/join_token/{TOKEN}) expired at "
        f"{stored.expires_at:%Y-%m-%d %H:%M:%S} UTC and a join token works only once: generate "
        "a new join token with 'tessera server token generate' and start the agent with "
        "--join-token <token>"
    )
    assert api.calls == []


def test_a_first_start_needs_a_node_attestor(
    tmp_path: Path, api: FakeNodeApi, clock: ManualClock
) -> None:
    agent, _ = new_agent(tmp_path, api, clock)
    with pytest.raises(ConfigError) as caught:
        asyncio.run(agent.start())
    assert caught.value.message == (
        "the agent has not attested yet and no node attestor is configured; pass --join-token "
        "(from 'tessera server token generate') or --x509pop-cert and --x509pop-key"
    )


def test_a_first_start_needs_a_way_to_trust_the_server(
    tmp_path: Path, api: FakeNodeApi, clock: ManualClock
) -> None:
    agent, _ = new_agent(tmp_path, api, clock, join_token=TOKEN * 2)
    with pytest.raises(ConfigError) as caught:
        asyncio.run(agent.start())
    assert caught.value.message == (
        "the agent has no trust bundle to verify the server with; pass --trust-bundle FILE "
        "(saved with 'tessera server bundle show') or --insecure-bootstrap"
    )


def test_the_next_poll_waits_until_the_next_rotation_at_most_five_seconds(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    short = entry("e-short", "spiffe://example.org/short", "unix:uid:3000", x509_svid_ttl=4)
    api.registered = {short.id: short}
    attested_before(tmp_path, authority, NOW)
    agent, _ = new_agent(tmp_path, api, clock)
    asyncio.run(agent.start())
    wait = agent._poll_wait()
    assert 1.8 <= wait <= 2.2
    clock.advance(timedelta(seconds=10))
    assert agent._poll_wait() == 0.0
    api.registered = {WEB.id: WEB}
    api.revision += 1
    asyncio.run(agent.sync_once(wait=0))
    assert agent._poll_wait() == 5.0


def test_jwt_svids_one_per_identity_or_only_the_one_asked_for(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    twin = entry("e-web-2", "spiffe://example.org/web", "unix:uid:1000", created_at=3)
    api.registered[twin.id] = twin
    attested_before(tmp_path, authority, NOW)
    agent, _ = new_agent(tmp_path, api, clock)
    both = parse_selectors(["unix:uid:1000", "unix:uid:2000"])

    async def scenario() -> tuple[list[str], list[str]]:
        await agent.start()
        every = await agent.fetch_jwt_svids(both, ["db"], None)
        only = await agent.fetch_jwt_svids(both, ["db"], "spiffe://example.org/db")
        return [s.spiffe_id for s in every], [s.spiffe_id for s in only]

    every, only = asyncio.run(scenario())
    assert every == ["spiffe://example.org/web", "spiffe://example.org/db"]
    assert only == ["spiffe://example.org/db"]


def test_an_evicted_join_token_agent_needs_a_new_token(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    attested_before(tmp_path, authority, NOW)
    api.evicted = True
    agent, _ = new_agent(tmp_path, api, clock, join_token=TOKEN)
    with pytest.raises(ConfigError) as caught:
        asyncio.run(agent.start())
    assert caught.value.message == (
        "the server refused the agent's SVID: spiffe://example.org/tessera/agent/join_token/x is "
        "not an attested agent; it must attest again; generate a new join token with 'tessera "
        "server token generate' and start the agent with --join-token <token>"
    )
    assert "attest" not in api.calls, "the token its ID was made from was spent long ago"

    new_token = "fedcba9876543210fedcba98"
    agent, _ = new_agent(tmp_path, api, clock, join_token=new_token)
    asyncio.run(agent.start())
    assert agent.identity is not None
    assert str(agent.identity.spiffe_id).endswith(f"/join_token/{new_token}")
    stored = AgentStorage(tmp_path / "agent").load_identity(agent.config.trust_domain)
    assert stored is not None and stored.spiffe_id == agent.identity.spiffe_id
    assert len(agent.x509_context(UID_1000).svids) == 1


def test_the_agent_renews_its_own_svid_at_half_life(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    attested_before(tmp_path, authority, NOW)
    agent, _ = new_agent(tmp_path, api, clock)

    async def scenario() -> None:
        await agent.start()
        first = agent.identity
        assert first is not None
        clock.set(first.renew_at - timedelta(seconds=1))
        await agent.sync_once(wait=0)
        assert "renew" not in api.calls
        clock.set(first.renew_at)
        await agent.sync_once(wait=0)
        assert api.calls.count("renew") == 1
        renewed = agent.identity
        assert renewed is not None and renewed.spiffe_id == first.spiffe_id
        assert renewed.expires_at > first.expires_at
        assert renewed.chain[0].serial_number != first.chain[0].serial_number
        # Stored before use: a restart goes on with the renewed SVID.
        stored = AgentStorage(tmp_path / "agent").load_identity(agent.config.trust_domain)
        assert stored is not None
        assert stored.chain[0].serial_number == renewed.chain[0].serial_number
        await agent.sync_once(wait=0)
        assert api.calls.count("renew") == 1, "not due again until the new half life"

    asyncio.run(scenario())


def node_certificate(tmp_path: Path, authority: AuthorityForTests) -> tuple[Path, Path]:
    """A node certificate and its key on disk, for the x509pop agent half."""
    node = authority.ca.issue_x509_svid("spiffe://example.org/node-cert", not_before=NOW,
                                        ttl=timedelta(days=7))  # fmt: skip
    return (write_pem(tmp_path / "node.pem", node.leaf),
            write_key_pem(tmp_path / "node.key", node.private_key))  # fmt: skip


def test_an_x509pop_agent_whose_svid_lapsed_attests_again_by_itself(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    cert, key = node_certificate(tmp_path, authority)
    flags = {"x509pop_cert": str(cert), "x509pop_key": str(key), "insecure_bootstrap": True}
    agent, _ = new_agent(tmp_path, api, clock, **flags)

    async def scenario() -> None:
        await agent.start()
        first = agent.identity
        assert first is not None and first.reattestable
        assert "/tessera/agent/x509pop/" in str(first.spiffe_id)
        api.unavailable = True  # no server while the SVID runs out: it cannot renew
        clock.set(first.expires_at + timedelta(seconds=1))
        with pytest.raises(Unavailable):
            await agent.sync_once(wait=0)
        api.unavailable = False
        await agent.sync_once(wait=0)
        again = agent.identity
        assert again is not None and again.spiffe_id == first.spiffe_id
        assert not again.expired(clock.now())
        # The first attestation, the attempt while no server answered, the one that worked.
        assert api.calls.count("attest") == 3 and "renew" not in api.calls
        assert agent.ready_problem() is None

    asyncio.run(scenario())


def test_a_taint_replaces_every_svid_its_authority_signed_at_once(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    from cryptography import x509

    attested_before(tmp_path, authority, NOW)
    agent, _ = new_agent(tmp_path, api, clock)
    ski = authority.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest.hex()

    async def scenario() -> None:
        await agent.start()
        before = {e: agent.cache.svid_for(e) for e in (WEB.id, DB.id)}
        assert all(s is not None and s.authority_id == ski for s in before.values())
        token = (await agent.fetch_jwt_svids(UID_1000, ["db"], None))[0].token
        signs, renewals = api.calls.count("sign_x509"), api.calls.count("renew")

        api.tainted = frozenset({ski, jwt_kid(token)})
        await agent.sync_once(wait=0)  # nothing was due by time: only the taint
        assert api.calls.count("sign_x509") > signs
        assert api.calls.count("renew") == renewals + 1, "the agent's own SVID too"
        for entry_id, old in before.items():
            new = agent.cache.svid_for(entry_id)
            assert new is not None and old is not None
            assert new.cert_chain_der != old.cert_chain_der
        jwt_signs = api.calls.count("sign_jwt")
        await agent.fetch_jwt_svids(UID_1000, ["db"], None)
        assert api.calls.count("sign_jwt") == jwt_signs + 1, "the tainted token was dropped"

    asyncio.run(scenario())


def test_bundles_are_fetched_again_only_when_their_sequence_moves(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    attested_before(tmp_path, authority, NOW)
    api.bundle_sequence = 3
    agent, _ = new_agent(tmp_path, api, clock)

    async def scenario() -> None:
        await agent.start()
        fetched = api.calls.count("bundles")
        await agent.sync_once(wait=0)
        await agent.sync_once(wait=0)
        assert api.calls.count("bundles") == fetched
        api.bundle_sequence = 4
        await agent.sync_once(wait=0)
        assert api.calls.count("bundles") == fetched + 1

    asyncio.run(scenario())


def jwt_kid(token: str) -> str:
    from workload_api.cache import jwt_key_id

    return jwt_key_id(token)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_an_unwritable_data_dir_is_refused_before_the_token_is_spent(
    tmp_path: Path, api: FakeNodeApi, clock: ManualClock, monkeypatch: pytest.MonkeyPatch,
    code: int,
) -> None:
    def write(path: Path, content: bytes, mode: int) -> None:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(storage_module, "write_file_atomically", write)
    agent, _ = new_agent(tmp_path, api, clock, join_token=TOKEN, insecure_bootstrap=True)
    with pytest.raises(ConfigError) as caught:
        asyncio.run(agent.start())
    assert caught.value.message == (
        f"the agent cannot write to its data directory {tmp_path / 'agent'} "
        f"({os.strerror(code)}); give it a --data-dir on a writable filesystem with free space"
    )
    assert api.calls == [], "the join token was not sent"


BANNED = (
    f"the server refused this agent as banned (agent spiffe://example.org/tessera/agent/"
    f"join_token/{TOKEN} is banned); it serves workloads no SVIDs until an operator runs "
    f"'tessera server agent unban --spiffe-id spiffe://example.org/tessera/agent/join_token/"
    f"{TOKEN}'"
)


def test_a_banned_agent_drops_its_svids_and_is_not_ready_until_unbanned(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    attested_before(tmp_path, authority, NOW)
    agent, _ = new_agent(tmp_path, api, clock)

    async def scenario() -> None:
        await agent.start()
        assert len(agent.x509_context(UID_1000).svids) == 1
        await agent.fetch_jwt_svids(UID_1000, ["db"], None)
        version = agent.version()

        api.banned = True
        syncing = asyncio.create_task(agent.sync_forever())
        for _ in range(100):  # the first round is refused; then the loop waits to retry
            await asyncio.sleep(0)
            if agent.ready_problem() is not None:
                break
        syncing.cancel()
        await asyncio.gather(syncing, return_exceptions=True)
        assert agent.ready_problem() == BANNED
        assert agent.x509_context(UID_1000).svids == ()
        assert len(agent.jwt_cache) == 0
        assert agent.version() > version, "watching workloads hear of it"

        api.banned = False
        await agent.sync_once(wait=0)
        assert agent.ready_problem() is None
        assert len(agent.x509_context(UID_1000).svids) == 1

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [BANNED]


def test_an_agent_banned_before_it_starts_stops_with_the_reason(
    tmp_path: Path, api: FakeNodeApi, authority: AuthorityForTests, clock: ManualClock
) -> None:
    attested_before(tmp_path, authority, NOW)
    api.banned = True
    agent, _ = new_agent(tmp_path, api, clock, join_token=TOKEN)
    with pytest.raises(ConfigError) as caught:
        asyncio.run(agent.start())
    assert caught.value.message == BANNED
    assert "attest" not in api.calls
