"""The node API's memory of which agent presented which SVID, so an idle agent sync
touches no database.

An entry maps (SPIFFE ID, serial of the presented SVID) to the agent record that
:func:`ca.issuance.agent_or_refuse` accepted; refusals are not remembered. It is
forgotten:

- at once, for a change this server makes to the agent (attest, renew, ban, unban,
  evict: the datastore tells its listeners when the transaction has ended);
- within one read of the :class:`~ca.revisions.RevisionWatcher`, for changes other
  servers make: when the datastore's agents counter moved by more than this
  server's own changes explain, every entry goes.

While the watcher is not following the datastore (not started, or its last read
failed) the cache is bypassed and every request reads the database, so a
database outage is reported as it always was::

    agents = AgentCache(store, watcher)
    agent = agents.agent_or_refuse(spiffe_id, cert.serial_number)
"""

from __future__ import annotations

import threading

from ca.datastore.interface import Datastore
from ca.datastore.records import AttestedAgent
from ca.issuance import agent_or_refuse
from ca.revisions import RevisionWatcher
from sdk.spiffeid import SpiffeId

MAX_CACHED_AGENTS = 100_000
# Own changes the watcher has not read yet; past this many (it is not running) they
# are forgotten, which only costs one forgetting of every entry when it runs again.
MAX_OWN_CHANGES = 10_000


class AgentCache:
    def __init__(
        self,
        store: Datastore,
        watcher: RevisionWatcher,
        *,
        max_agents: int = MAX_CACHED_AGENTS,
    ) -> None:
        self._store = store
        self._watcher = watcher
        self._max_agents = max_agents
        self._lock = threading.Lock()
        self._agents: dict[tuple[str, int], AttestedAgent] = {}
        self._serials: dict[str, set[int]] = {}  # the keys of each agent's entries
        # One more for every change heard of: a record read across a change is not kept.
        self._generation = 0
        self._counter: int | None = None  # the agents counter the entries agree with
        self._own_changes: set[int] = set()  # counter values this server's changes took
        store.on_agent_change(self._changed_here)

    def agent_or_refuse(self, spiffe_id: SpiffeId, serial: int) -> AttestedAgent:
        """:func:`ca.issuance.agent_or_refuse`, answered from memory when it can be."""
        if not self._watcher.following:
            return agent_or_refuse(self._store, spiffe_id, serial)
        key = (str(spiffe_id), serial)
        with self._lock:
            self._catch_up(self._watcher.agents)
            cached = self._agents.get(key)
            generation = self._generation
        if cached is not None:
            return cached
        agent = agent_or_refuse(self._store, spiffe_id, serial)
        with self._lock:
            if generation == self._generation:
                if len(self._agents) >= self._max_agents:
                    self._forget_all()
                self._agents[key] = agent
                self._serials.setdefault(key[0], set()).add(serial)
        return agent

    def cached(self, spiffe_id: SpiffeId, serial: int) -> AttestedAgent | None:
        """What :meth:`agent_or_refuse` answers, if it can answer from memory; None when
        it would read the datastore (for callers that must not wait on it)."""
        if not self._watcher.following:
            return None
        with self._lock:
            self._catch_up(self._watcher.agents)
            return self._agents.get((str(spiffe_id), serial))

    def __len__(self) -> int:
        with self._lock:
            return len(self._agents)

    def _changed_here(self, spiffe_id: str, counter: int | None) -> None:
        with self._lock:
            self._generation += 1
            for serial in self._serials.pop(spiffe_id, ()):
                del self._agents[(spiffe_id, serial)]
            if counter is not None and (self._counter is None or counter > self._counter):
                if len(self._own_changes) >= MAX_OWN_CHANGES:
                    self._own_changes.clear()
                self._own_changes.add(counter)

    def _catch_up(self, counter: int) -> None:
        """Forget everything if the agents counter moved past what this server did."""
        if counter == self._counter:
            return
        if self._counter is None or counter < self._counter:
            explained = False  # first read, or a database restored from a backup
        else:
            explained = all(
                value in self._own_changes for value in range(self._counter + 1, counter + 1)
            )
        self._own_changes = {value for value in self._own_changes if value > counter}
        self._counter = counter
        if not explained:
            self._forget_all()

    def _forget_all(self) -> None:
        self._generation += 1
        self._agents.clear()
        self._serials.clear()
