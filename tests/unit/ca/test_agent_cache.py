"""AgentCache: the node API answers "who is this agent" from memory, and forgets at once
what this server changes and within a watcher read what other servers change.

The watcher is a stand-in whose ``following`` and ``agents`` the test sets; the
datastore is real (SQLite), with ``get_agent`` counted to see which calls read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from spiffe import SpiffeId

from ca.agent_cache import AgentCache
from ca.datastore import Datastore
from ca.datastore.records import AttestedAgent
from sdk.clock import ManualClock
from sdk.errors import PermissionDenied, Unavailable

START = datetime(2030, 1, 1, tzinfo=UTC)
AGENT = "spiffe://example.org/tessera/agent/join_token/a"
OTHER = "spiffe://example.org/tessera/agent/join_token/b"


class FollowingWatcher:
    """What the cache asks of the RevisionWatcher: is it following, and the agents counter."""

    def __init__(self, agents: int) -> None:
        self.following = True
        self.agents = agents


class CountedStore:
    """Counts the datastore reads of agent records made through the cache."""

    def __init__(self, store: Datastore) -> None:
        self.get_agent = store.get_agent
        self.reads = 0
        self.during_read: Any = None  # called between reading a record and returning it

    def __call__(self, spiffe_id: str) -> AttestedAgent:
        self.reads += 1
        agent = self.get_agent(spiffe_id)
        if self.during_read is not None:
            self.during_read()
        return agent


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Datastore]:
    opened = Datastore.open(sqlite_url, clock=ManualClock(START))
    yield opened
    opened.close()


@pytest.fixture
def reads(store: Datastore, monkeypatch: pytest.MonkeyPatch) -> CountedStore:
    counted = CountedStore(store)
    monkeypatch.setattr(store, "get_agent", counted)
    return counted


def attest(store: Datastore, spiffe_id: str = AGENT, serial: str = "1f") -> None:
    store.register_agent(
        spiffe_id, attestation_type="join_token", serial=serial,
        expires_at=START + timedelta(hours=1),
    )


def caught_up(store: Datastore) -> tuple[AgentCache, FollowingWatcher]:
    """A cache whose watcher has read the agents counter as it is now."""
    watcher = FollowingWatcher(store.agent_changes())
    return AgentCache(store, watcher), watcher  # type: ignore[arg-type]


def refusal(cache: AgentCache, spiffe_id: str, serial: int) -> str:
    with pytest.raises(PermissionDenied) as refused:
        cache.agent_or_refuse(SpiffeId(spiffe_id), serial)
    return refused.value.message


def test_the_second_request_reads_no_database(store, reads):
    attest(store)
    cache, _ = caught_up(store)

    first = cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)
    second = cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)

    assert second == first
    assert (first.spiffe_id, first.serial) == (AGENT, "1f")
    assert reads.reads == 1


def test_a_ban_here_is_refused_on_the_very_next_request(store, reads):
    attest(store)
    cache, watcher = caught_up(store)
    cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)

    store.set_agent_banned(AGENT, True)  # the watcher has not read the counter yet

    assert refusal(cache, AGENT, 0x1F) == f"agent {AGENT} is banned"
    store.set_agent_banned(AGENT, False)
    assert cache.agent_or_refuse(SpiffeId(AGENT), 0x1F).banned is False
    assert watcher.agents == 1


def test_an_eviction_here_is_refused_on_the_very_next_request(store, reads):
    attest(store)
    cache, _ = caught_up(store)
    cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)

    store.delete_agent(AGENT)

    assert refusal(cache, AGENT, 0x1F) == f"{AGENT} is not an attested agent; it must attest again"


def test_the_svid_before_a_renewal_is_refused_once_the_renewed_one_is_used(store, reads):
    attest(store)
    cache, _ = caught_up(store)
    assert cache.agent_or_refuse(SpiffeId(AGENT), 0x1F).serial == "1f"

    store.update_agent_serial(AGENT, "20", START + timedelta(hours=2))
    assert cache.agent_or_refuse(SpiffeId(AGENT), 0x1F).serial == "20"  # answer lost
    cache.agent_or_refuse(SpiffeId(AGENT), 0x20)  # the renewed SVID is in use

    assert refusal(cache, AGENT, 0x1F) == (
        f"agent {AGENT} presented an SVID that is no longer its current one"
    )


def test_changes_here_forget_only_the_agent_changed(store, reads):
    attest(store)
    attest(store, OTHER, "2a")
    cache, watcher = caught_up(store)
    cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)
    cache.agent_or_refuse(SpiffeId(OTHER), 0x2A)
    assert reads.reads == 2

    store.set_agent_banned(OTHER, True)
    watcher.agents = store.agent_changes()  # the watcher reads this server's own change

    cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)
    assert reads.reads == 2
    assert len(cache) == 1


def test_a_change_by_another_server_is_heard_at_the_watchers_next_read(
    store, reads, sqlite_url
):
    attest(store)
    cache, watcher = caught_up(store)
    cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)
    with Datastore.open(sqlite_url, clock=ManualClock(START)) as other_server:
        other_server.set_agent_banned(AGENT, True)

    # Until the watcher reads the counter (every 0.2 s), the record is as it was...
    assert cache.agent_or_refuse(SpiffeId(AGENT), 0x1F).banned is False
    watcher.agents = store.agent_changes()
    # ...and from that read on, the ban holds.
    assert refusal(cache, AGENT, 0x1F) == f"agent {AGENT} is banned"
    assert len(cache) == 0


def test_a_counter_moved_by_this_server_and_another_forgets_everything(store, reads, sqlite_url):
    attest(store)
    attest(store, OTHER, "2a")
    cache, watcher = caught_up(store)
    cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)
    store.set_agent_banned(OTHER, True)
    with Datastore.open(sqlite_url, clock=ManualClock(START)) as other_server:
        other_server.set_agent_banned(AGENT, True)
    watcher.agents = store.agent_changes()

    assert refusal(cache, AGENT, 0x1F) == f"agent {AGENT} is banned"


def test_a_record_read_across_a_change_is_not_kept(store, reads):
    attest(store)
    cache, _ = caught_up(store)
    reads.during_read = lambda: store.set_agent_banned(AGENT, True)

    assert cache.agent_or_refuse(SpiffeId(AGENT), 0x1F).banned is False  # read before
    reads.during_read = None

    assert refusal(cache, AGENT, 0x1F) == f"agent {AGENT} is banned"
    assert len(cache) == 0


def test_without_a_following_watcher_every_request_reads_the_database(store, reads):
    attest(store)
    cache, watcher = caught_up(store)
    watcher.following = False

    cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)
    cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)

    assert reads.reads == 2
    assert len(cache) == 0


def test_a_database_outage_is_reported_not_hidden(store, reads):
    attest(store)
    cache, watcher = caught_up(store)
    cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)
    watcher.following = False  # the watcher's last read failed
    store.close()

    with pytest.raises(Unavailable) as unavailable:
        cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)
    assert unavailable.value.message == "the datastore is closed; the server is shutting down"


def test_refusals_are_not_remembered(store, reads):
    cache, _ = caught_up(store)
    assert refusal(cache, AGENT, 0x1F) == f"{AGENT} is not an attested agent; it must attest again"

    attest(store)

    assert cache.agent_or_refuse(SpiffeId(AGENT), 0x1F).serial == "1f"


def test_cached_answers_only_from_memory_and_never_reads_the_database(store, reads):
    attest(store)
    cache, watcher = caught_up(store)

    assert cache.cached(SpiffeId(AGENT), 0x1F) is None  # not asked for yet: no read
    assert reads.reads == 0
    agent = cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)
    assert cache.cached(SpiffeId(AGENT), 0x1F) == agent
    assert cache.cached(SpiffeId(AGENT), 0x20) is None  # another SVID: not known
    store.set_agent_banned(AGENT, True)
    assert cache.cached(SpiffeId(AGENT), 0x1F) is None  # forgotten at once
    store.set_agent_banned(AGENT, False)
    cache.agent_or_refuse(SpiffeId(AGENT), 0x1F)
    watcher.following = False
    assert cache.cached(SpiffeId(AGENT), 0x1F) is None  # memory is not trusted then
    assert reads.reads == 2
