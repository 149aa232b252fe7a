"""The mesh's catalog in the datastore, on SQLite and PostgreSQL alike: reports replace an
agent's set, changes take mesh revisions, leases expire, tombstones reach syncing agents."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from ca.datastore.interface import Datastore
from ca.datastore.records import InstanceKey, ReportedInstance
from ca.datastore.sql import open_datastore
from mesh import parse_documents
from mesh.catalog import Health
from sdk.address import HostPort
from sdk.clock import ManualClock

START = datetime(2030, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)
NODE_A = "spiffe://example.org/agent/a"
NODE_B = "spiffe://example.org/agent/b"
USERS_ID = "spiffe://example.org/users"
USERS = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: users}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{number: 80, protocol: HTTP}]
"""


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def store(datastore_url: str, clock: ManualClock) -> Iterator[Datastore]:
    opened = open_datastore(datastore_url, clock=clock)
    yield opened
    opened.close()


def instance(address: str, health: Health = "unknown", **labels: str) -> ReportedInstance:
    return ReportedInstance("users", HostPort.parse(address), USERS_ID, labels, health)


def catalog(store: Datastore) -> list[tuple[str, str, str, str, datetime]]:
    return [(i.node, i.service, str(i.address), i.health, i.since)
            for i in store.mesh_catalog()]


def test_a_report_replaces_the_agents_set_and_each_change_is_a_revision(
    store: Datastore, clock: ManualClock
) -> None:
    store.apply_mesh(parse_documents(USERS, source="mesh.yaml"))  # revision 1
    assert store.report_mesh_instances(NODE_A, [instance("10.0.0.1:8443")], lease=LEASE) == 2
    assert catalog(store) == [(NODE_A, "users", "10.0.0.1:8443", "unknown", START)]

    clock.advance(timedelta(seconds=5))
    same = store.report_mesh_instances(NODE_A, [instance("10.0.0.1:8443")], lease=LEASE)
    assert same == 2  # a renewal only: no revision, no agent woken

    healthy = store.report_mesh_instances(
        NODE_A, [instance("10.0.0.1:8443", "healthy")], lease=LEASE)
    assert healthy == 3
    later = START + timedelta(seconds=5)
    assert catalog(store) == [(NODE_A, "users", "10.0.0.1:8443", "healthy", later)]

    # Another agent's report leaves A's rows alone; A's next report drops what it omits.
    store.report_mesh_instances(NODE_B, [instance("10.0.0.2:8443")], lease=LEASE)
    assert store.report_mesh_instances(NODE_A, [], lease=LEASE) == 5
    assert catalog(store) == [(NODE_B, "users", "10.0.0.2:8443", "unknown", later)]

    changes = store.mesh_changed_since(3)
    assert (changes.revision, changes.full) == (5, False)
    assert [str(i.address) for i in changes.instances] == ["10.0.0.2:8443"]
    assert changes.removed_instances == (InstanceKey(NODE_A, "users", "10.0.0.1:8443"),)
    everything = store.mesh_changed_since(0)
    assert (everything.full, everything.removed_instances) == (True, ())
    assert [str(i.address) for i in everything.instances] == ["10.0.0.2:8443"]

    actions = [(e.actor, e.action, e.target) for e in reversed(store.list_audit())]
    assert actions == [
        (NODE_A, "mesh.instance.register", "users 10.0.0.1:8443"),
        (NODE_B, "mesh.instance.register", "users 10.0.0.2:8443"),
        (NODE_A, "mesh.instance.deregister", "users 10.0.0.1:8443"),
    ]  # health changes are not audited
    assert store.verify_audit().intact


def test_an_unhealthy_instance_keeps_why_and_a_new_reason_alone_wakes_no_agent(
    store: Datastore, clock: ManualClock
) -> None:
    store.report_mesh_instances(NODE_A, [instance("10.0.0.1:8443", "healthy")], lease=LEASE)
    audited = len(store.list_audit())
    failing = ReportedInstance("users", HostPort.parse("10.0.0.1:8443"), USERS_ID, {},
                               "unhealthy", "HTTP 503 from 127.0.0.1:8080/healthz")
    revision = store.report_mesh_instances(NODE_A, [failing], lease=LEASE)
    [unhealthy] = store.mesh_catalog()
    assert (unhealthy.health, unhealthy.detail) == (
        "unhealthy", "HTTP 503 from 127.0.0.1:8080/healthz")
    assert store.mesh_changed_since(revision - 1).instances == (unhealthy,)

    # Another reason, same health: stored, shown, but no revision (no agent is woken).
    clock.advance(timedelta(seconds=5))
    refused = ReportedInstance("users", HostPort.parse("10.0.0.1:8443"), USERS_ID, {},
                               "unhealthy", "connection refused by 127.0.0.1:8080")
    assert store.report_mesh_instances(NODE_A, [refused], lease=LEASE) == revision
    [still] = store.mesh_catalog()
    assert (still.detail, still.since) == ("connection refused by 127.0.0.1:8080", START)

    # Healthy again: a revision, and no detail.
    healthy = store.report_mesh_instances(NODE_A, [instance("10.0.0.1:8443", "healthy")],
                                          lease=LEASE)
    assert healthy == revision + 1
    assert [i.detail for i in store.mesh_catalog()] == [None]
    assert len(store.list_audit()) == audited  # health and its reasons are not audited


def test_instances_whose_lease_passed_expire_and_a_report_renews_the_lease(
    store: Datastore, clock: ManualClock
) -> None:
    store.report_mesh_instances(NODE_A, [instance("10.0.0.1:8443")], lease=LEASE)
    store.report_mesh_instances(NODE_B, [instance("10.0.0.2:8443")], lease=LEASE)
    clock.advance(timedelta(seconds=20))
    store.report_mesh_instances(NODE_B, [instance("10.0.0.2:8443")], lease=LEASE)  # renewed
    clock.advance(timedelta(seconds=10))
    revision = store.mesh_revision()

    assert store.expire_mesh_instances() == [InstanceKey(NODE_A, "users", "10.0.0.1:8443")]
    assert [i.node for i in store.mesh_catalog()] == [NODE_B]
    assert store.mesh_revision() == revision + 1
    assert store.expire_mesh_instances() == []
    assert store.mesh_revision() == revision + 1  # nothing expired: nothing written
    assert store.list_audit()[0].action == "mesh.instance.expire"

    # A's tombstone is purged with the mesh's others.
    assert store.purge_mesh_tombstones(store.mesh_revision() + 1) == 1
    assert store.mesh_changed_since(revision).removed_instances == ()


def test_a_catalog_change_keeps_the_configuration_it_does_not_change(
    store: Datastore,
) -> None:
    store.apply_mesh(parse_documents(USERS, source="mesh.yaml"))
    store.report_mesh_instances(NODE_A, [instance("10.0.0.1:8443")], lease=LEASE)
    config, revision = store.mesh_config()
    assert (len(config), revision) == (1, 2)
    orders = USERS.replace("users}", "orders}").replace("/users]", "/orders]")
    result = store.apply_mesh(parse_documents(orders, source="mesh.yaml"))
    assert result.revision == 3
    assert [r.name for r in store.mesh_config()[0]] == ["orders", "users"]
