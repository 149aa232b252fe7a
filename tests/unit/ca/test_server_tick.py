"""The server's periodic work, driven by a manual clock."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from attestor.selector import Selector
from ca.config import server_config
from ca.datastore.records import IssuedSvid, NewEntry
from ca.server import Server
from mesh import parse_documents
from sdk.clock import ManualClock
from tests.unit.ca.conftest import START


def test_the_tick_lets_expired_issuance_records_go_after_a_day(tmp_path: Path) -> None:
    clock = ManualClock(START)
    server = Server(server_config({"trust_domain": "example.org", "data_dir": str(tmp_path),
                                   "bind": "127.0.0.1:0",  # never listens: any port will do
                                   "key_manager": {"memory": {}}}), clock=clock)
    try:
        server.store.record_issued_svids([
            IssuedSvid(serial="0a", spiffe_id="spiffe://example.org/old", kind="x509",
                       agent_id=None, authority_id="x", expires_at=START + timedelta(hours=1)),
            IssuedSvid(serial="0b", spiffe_id="spiffe://example.org/new", kind="x509",
                       agent_id=None, authority_id="x", expires_at=START + timedelta(days=2)),
        ])
        server._tick_once()
        assert server.store.count_issued_svids() == 2
        clock.advance(timedelta(days=1, hours=2))  # the first expired a day and an hour ago
        server._next_count = 0.0  # due now, as 15 s would have made it
        server._tick_once()
        assert server.store.count_issued_svids() == 1
    finally:
        server.store.close()


def test_the_tick_purges_tombstones_once_older_than_the_retention(tmp_path: Path) -> None:
    clock = ManualClock(START)
    server = Server(server_config({"trust_domain": "example.org", "data_dir": str(tmp_path),
                                   "bind": "127.0.0.1:0",  # never listens: any port will do
                                   "key_manager": {"memory": {}},
                                   "tombstone_retention": "1h"}), clock=clock)
    store = server.store
    web = store.create_entry(entry("web"))
    synced = store.current_revision()  # an agent synced here, then went quiet
    tombstones: list[int] = []
    try:
        for round_ in range(300):  # churn: an entry comes and goes every minute for 5 h
            churned = store.create_entry(entry(f"job-{round_}"))
            store.delete_entry(churned.id)
            server._tick_once()
            tombstones.append(sum(e.deleted for e in store.entries_changed_since(0)))
            clock.advance(timedelta(minutes=1))
        # Kept: the deletions of the last hour (and of the tick before the horizon moved).
        assert max(tombstones) <= 62
        assert tombstones[-1] >= 60
        assert store.purged_revision() > synced
        # The agent behind the purge still learns the entries it gets in full.
        assert [e.id for e in store.list_entries()] == [web.id]
    finally:
        store.close()


def test_no_tombstone_is_purged_before_the_server_watched_for_the_retention(
    tmp_path: Path,
) -> None:
    clock = ManualClock(START)
    server = Server(server_config({"trust_domain": "example.org", "data_dir": str(tmp_path),
                                   "bind": "127.0.0.1:0",  # never listens: any port will do
                                   "key_manager": {"memory": {}}}), clock=clock)
    store = server.store
    try:
        gone = store.create_entry(entry("web"))
        store.delete_entry(gone.id)
        store.create_entry(entry("api"))
        server._tick_once()
        clock.advance(timedelta(hours=23, minutes=59))
        server._tick_once()
        assert store.purged_revision() == 0  # the default retention is a day
        clock.advance(timedelta(minutes=1))
        server._tick_once()
        assert store.purged_revision() == 3
        assert [e.id for e in store.entries_changed_since(0) if e.deleted] == []
    finally:
        store.close()


def entry(name: str) -> NewEntry:
    return NewEntry(spiffe_id=f"spiffe://example.org/{name}",
                    parent_id="spiffe://example.org/node",
                    selectors=(Selector("unix", "uid:1000"),))


MESH = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: users}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: users}
spec:
  hosts: [users]
  http:
  - route: [{destination: {host: users}}]
"""


def test_the_tick_purges_mesh_tombstones_once_older_than_the_retention(tmp_path: Path) -> None:
    clock = ManualClock(START)
    server = Server(server_config({"trust_domain": "example.org", "data_dir": str(tmp_path),
                                   "bind": "127.0.0.1:0",  # never listens: any port will do
                                   "key_manager": {"memory": {}},
                                   "tombstone_retention": "1h"}), clock=clock)
    store = server.store
    try:
        store.apply_mesh(parse_documents(MESH))
        store.delete_mesh_resource("VirtualService", "users")
        server._tick_once()
        clock.advance(timedelta(minutes=59))
        server._tick_once()
        assert store.mesh_purged_revision() == 0
        assert [r.deleted for r in store.mesh_changed_since(1).resources] == [True]
        clock.advance(timedelta(minutes=1))
        server._tick_once()
        assert store.mesh_purged_revision() == 2
        # An agent still at revision 1 may have missed the delete: it gets everything.
        behind = store.mesh_changed_since(1)
        assert (behind.full, [r.kind for r in behind.resources]) == (True, ["Service"])
    finally:
        store.close()
