"""``tessera up``: the user's SPIFFE ID, the entry, the port fallback, the summary,
and a whole local trust domain started and stopped in this process."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
from pathlib import Path

import pytest
from spiffe import TrustDomain

from ca.datastore.store import Datastore
from sdk.clock import ManualClock
from sdk.errors import ConfigError
from sdk.spiffeid import parse_spiffe_id
from tessera.up import (
    LocalTrustDomain,
    UpSettings,
    UpSummary,
    claim_trust_domain,
    ensure_user_entry,
    listenable_port,
    login_name,
    user_spiffe_id,
)
from tests.unit.ca.conftest import START

TD = TrustDomain("example.org")


# -- the user's SPIFFE ID -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("alice", "spiffe://example.org/user/alice"),
        ("Alice_2.x-y", "spiffe://example.org/user/Alice_2.x-y"),
        ("john.doe@corp.example", "spiffe://example.org/user/john.doe-corp.example"),
        ("CORP\\Alice Smith", "spiffe://example.org/user/CORP-Alice-Smith"),
        ("a/b", "spiffe://example.org/user/a-b"),
        ("josé", "spiffe://example.org/user/jos"),
        ("$ci runner$", "spiffe://example.org/user/ci-runner"),
        ("...", "spiffe://example.org/user/..."),
    ],
)
def test_user_names_become_one_valid_path_segment(name: str, expected: str) -> None:
    spiffe_id = user_spiffe_id(TD, 1000, name)

    assert str(spiffe_id) == expected
    assert parse_spiffe_id(str(spiffe_id)) == spiffe_id


@pytest.mark.parametrize("name", [None, "", ".", "..", "@@", "ü"])
def test_a_user_without_a_usable_name_is_named_by_uid(name: str | None) -> None:
    assert str(user_spiffe_id(TD, 1234, name)) == "spiffe://example.org/user/uid-1234"


def test_a_uid_without_a_passwd_entry_is_uid_n() -> None:
    uid = max(entry.pw_uid for entry in pwd.getpwall()) + 4321

    assert login_name(uid) is None
    assert str(user_spiffe_id(TD, uid, login_name(uid))) == f"spiffe://example.org/user/uid-{uid}"


def test_the_calling_user_is_named_from_the_passwd_database() -> None:
    assert login_name(os.getuid()) == pwd.getpwuid(os.getuid()).pw_name


# -- the entry ----------------------------------------------------------------------------


def test_the_user_entry_is_created_once(sqlite_url: str) -> None:
    spiffe_id = parse_spiffe_id("spiffe://example.org/user/alice")
    parent_id = parse_spiffe_id("spiffe://example.org/node/local")
    with Datastore.open(sqlite_url, clock=ManualClock(START)) as store:
        first, created = ensure_user_entry(
            store, TD, spiffe_id=spiffe_id, parent_id=parent_id, uid=1000
        )
        again, created_again = ensure_user_entry(
            store, TD, spiffe_id=spiffe_id, parent_id=parent_id, uid=1000
        )

        assert (created, created_again) == (True, False)
        assert again.id == first.id
        assert [str(s) for s in first.selectors] == ["unix:uid:1000"]
        assert first.parent_id == "spiffe://example.org/node/local"
        assert store.count_entries() == 1
        assert [e.action for e in store.list_audit()] == ["entry.create"]


def test_another_uid_gets_an_entry_of_its_own(sqlite_url: str) -> None:
    spiffe_id = parse_spiffe_id("spiffe://example.org/user/alice")
    parent_id = parse_spiffe_id("spiffe://example.org/node/local")
    with Datastore.open(sqlite_url, clock=ManualClock(START)) as store:
        ensure_user_entry(store, TD, spiffe_id=spiffe_id, parent_id=parent_id, uid=1000)
        _, created = ensure_user_entry(
            store, TD, spiffe_id=spiffe_id, parent_id=parent_id, uid=1001
        )

        assert created
        assert store.count_entries() == 2


# -- the data dir's trust domain ---------------------------------------------------------------


def test_a_data_dir_keeps_its_trust_domain(tmp_path: Path) -> None:
    claim_trust_domain(tmp_path, TD)
    claim_trust_domain(tmp_path, TD)

    with pytest.raises(ConfigError) as refused:
        claim_trust_domain(tmp_path, TrustDomain("other.org"))

    assert (tmp_path / "trust-domain").read_text() == "example.org\n"
    assert refused.value.message == (
        f"the data dir {tmp_path} holds trust domain example.org, not other.org; "
        "pass --trust-domain example.org, or another --data-dir for other.org"
    )


# -- ports --------------------------------------------------------------------------------


def test_a_free_port_is_kept() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])

    assert listenable_port("127.0.0.1", port) == port


def test_a_taken_port_falls_back_to_an_ephemeral_one() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = int(taken.getsockname()[1])

        other = listenable_port("127.0.0.1", port)

    assert other not in (0, port)


def test_an_address_of_another_machine_is_refused() -> None:
    with pytest.raises(ConfigError) as refused:
        listenable_port("192.0.2.1", 8081)  # TEST-NET-1: never an address of this machine

    assert refused.value.message == (
        "cannot listen on 192.0.2.1; pass an address of this machine, e.g. --bind 127.0.0.1:8081"
    )


# -- the summary ----------------------------------------------------------------------------


def summary() -> UpSummary:
    return UpSummary(
        trust_domain="example.org",
        spiffe_id="spiffe://example.org/user/alice",
        selector="unix:uid:1000",
        parent_id="spiffe://example.org/node/local",
        agent_id="spiffe://example.org/tessera/agent/join_token/abc",
        server_address="127.0.0.1:8081",
        data_dir=Path("/home/alice/.tessera"),
        server_data_dir=Path("/home/alice/.tessera/server"),
        agent_data_dir=Path("/home/alice/.tessera/agent"),
        admin_socket=Path("/home/alice/.tessera/server/admin.sock"),
        socket=Path("/home/alice/.tessera/agent/agent.sock"),
        agent_health="http://127.0.0.1:8088",
        ready_seconds=1.234,
    )


def test_the_summary_tells_a_person_what_to_do_next() -> None:
    assert summary().text() == (
        "Tessera trust domain example.org is up (1.2s).\n"
        "  server     https://127.0.0.1:8081   "
        "(admin: tessera server ... --data-dir /home/alice/.tessera/server)\n"
        "  agent      /home/alice/.tessera/agent/agent.sock\n"
        "  you        spiffe://example.org/user/alice   (unix:uid:1000)\n"
        "\n"
        "In another shell:\n"
        "  export SPIFFE_ENDPOINT_SOCKET=unix:///home/alice/.tessera/agent/agent.sock\n"
        "  tessera agent api fetch x509\n"
        "\n"
        "Ctrl-C stops it."
    )


def test_the_summary_as_json() -> None:
    document = summary().to_json()

    assert document["export"] == (
        "export SPIFFE_ENDPOINT_SOCKET=unix:///home/alice/.tessera/agent/agent.sock"
    )
    assert document["endpoint_socket"] == "unix:///home/alice/.tessera/agent/agent.sock"
    assert document["socket"] == "/home/alice/.tessera/agent/agent.sock"
    assert document["server_address"] == "127.0.0.1:8081"
    assert document["server_data_dir"] == "/home/alice/.tessera/server"
    assert document["agent_data_dir"] == "/home/alice/.tessera/agent"
    assert document["ready_seconds"] == 1.234


# -- the whole thing, in this process -------------------------------------------------------


def run_until_ready(data_dir: Path) -> UpSummary:
    """Start a local trust domain, take its summary once ready, and stop it."""
    local = LocalTrustDomain(UpSettings(TD, data_dir, bind="127.0.0.1:0", health_bind="0"))
    seen: list[UpSummary] = []

    def ready(summary: UpSummary) -> None:
        seen.append(summary)
        svids = local.agent.cache.x509_svid_count
        assert svids == 1, f"the agent holds {svids} X509-SVIDs once ready, not 1"
        local.agent.stop()

    asyncio.run(local.run(on_ready=ready))
    assert len(seen) == 1
    assert not (data_dir / "server" / "admin.sock").exists()
    assert not Path(seen[0].socket).exists()
    return seen[0]


def test_up_serves_the_user_and_a_restart_reuses_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "up"
    name = user_spiffe_id(TD, os.getuid(), login_name(os.getuid()))

    first = run_until_ready(data_dir)
    second = run_until_ready(data_dir)

    assert first.spiffe_id == str(name)
    assert first.selector == f"unix:uid:{os.getuid()}"
    assert first.socket == data_dir.absolute() / "agent" / "agent.sock"
    assert first.agent_id.startswith("spiffe://example.org/tessera/agent/join_token/")
    assert second.agent_id == first.agent_id
    with Datastore.open(f"sqlite:///{data_dir / 'server' / 'datastore.sqlite3'}") as store:
        assert store.count_entries() == 1
        assert [a.spiffe_id for a in store.list_agents()] == [first.agent_id]
        assert store.list_join_tokens() == []  # the restart's unused token is burnt


def test_an_agent_of_a_server_made_anew_is_refused_with_what_to_do(tmp_path: Path) -> None:
    data_dir = tmp_path / "up"
    run_until_ready(data_dir)
    shutil.rmtree(data_dir / "server")

    with pytest.raises(ConfigError) as refused:
        LocalTrustDomain(UpSettings(TD, data_dir, bind="127.0.0.1:0", health_bind="0"))

    assert refused.value.message == (
        f"the agent's SVID in {data_dir / 'agent'} was issued by a CA this server does not "
        f"have (was {data_dir / 'server'} made anew?); remove {data_dir / 'agent'} and start again"
    )
    shutil.rmtree(data_dir / "agent")
    assert run_until_ready(data_dir).spiffe_id == str(
        user_spiffe_id(TD, os.getuid(), login_name(os.getuid()))
    )
