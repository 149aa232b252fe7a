"""The datastore contract: every test runs against SQLite and PostgreSQL alike.

The tests are written against the Protocols of :mod:`ca.datastore.interface`, and
the first ones check that the SQL store has every method they ask for.

The ``datastore_url`` fixture (tests/conftest.py) gives a fresh SQLite file or a
fresh PostgreSQL database per test; the ``store`` fixture opens it with a
ManualClock so nothing here sleeps.
"""

from __future__ import annotations

import inspect
import os
import socket
import sqlite3
import stat
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import exc as sa_exc

import ca.datastore
import ca.datastore.store
from attestor.selector import Selector
from ca.datastore import (
    AuditNote,
    AuditVerification,
    Authority,
    IssuedSvid,
    MeshApplyResult,
    MeshChanges,
    MeshResource,
    NewEntry,
    RegistrationEntry,
    as_new_entry,
    default_datastore_url,
)
from ca.datastore.interface import PROTOCOLS, Datastore, RevisionMoved, protocol_members
from ca.datastore.migrate import (
    VERSION_TABLE,
    alembic_config,
    head_revision,
    schema_revision,
    upgrade,
)
from ca.datastore.schema import Base, IssuedSvidRow
from ca.datastore.sql import SqlDatastore, open_datastore
from mesh import Change, Config, Resource, parse_documents
from mesh import ConfigError as MeshConfigError
from sdk.clock import ManualClock
from sdk.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

START = datetime(2030, 1, 1, tzinfo=UTC)
TD = "spiffe://example.org"
AGENT = f"{TD}/tessera/agent/x509pop/node-1"
OTHER = f"{TD}/tessera/agent/x509pop/node-2"
UNAVAILABLE_END = "; check that the database is running and the URL is right"


def sel(text: str) -> Selector:
    return Selector.parse(text)


def new_entry(
    name: str = "web",
    parent: str = AGENT,
    selectors: tuple[str, ...] = ("unix:uid:1000",),
    **kw: object,
) -> NewEntry:
    return NewEntry(
        spiffe_id=f"{TD}/{name}",
        parent_id=parent,
        selectors=tuple(sel(s) for s in selectors),
        **kw,  # type: ignore[arg-type]
    )


def authority(authority_id: str, **kw: object) -> Authority:
    values: dict[str, object] = {
        "authority_id": authority_id,
        "kind": "x509",
        "server_id": "server-a",
        "status": "prepared",
        "tainted": False,
        "revoked": False,
        "key_id": f"key-{authority_id}",
        "key_type": "ec-p256",
        "not_before": START,
        "not_after": START + timedelta(days=1),
        "certificate": b"\x30\x03cert",
        "chain": b"",
        "upstream_roots": b"",
        "public_key": b"\x30\x03spki",
        "created_at": START,
    }
    values.update(kw)
    return Authority(**values)  # type: ignore[arg-type]


def svid(serial: str, **kw: object) -> IssuedSvid:
    values: dict[str, object] = {
        "serial": serial,
        "spiffe_id": f"{TD}/web",
        "kind": "x509",
        "agent_id": AGENT,
        "authority_id": "ab12",
        "expires_at": START + timedelta(hours=1),
    }
    values.update(kw)
    return IssuedSvid(**values)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def store(datastore_url: str, clock: ManualClock) -> Iterator[Datastore]:
    opened = open_datastore(datastore_url, clock=clock)
    yield opened
    opened.close()


# -- the Protocols ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_the_sql_store_has_every_method_of_the_protocol_as_it_is_declared(
    store: Datastore, protocol: type[Any]
) -> None:
    assert isinstance(store, protocol)
    for name in sorted(protocol_members(protocol)):
        declared = inspect.getattr_static(protocol, name)
        implemented = inspect.getattr_static(SqlDatastore, name)
        if isinstance(declared, property):
            assert isinstance(implemented, property), name
            continue
        assert _parameters(implemented) == _parameters(declared), name


def _parameters(method: Any) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults: mypy checks the types (``_conforms`` in ca.datastore.sql)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]


def test_the_datastore_protocol_is_every_kind_of_record_and_the_lifecycle() -> None:
    kinds = set().union(*(protocol_members(p) for p in PROTOCOLS if p is not Datastore))
    lifecycle = {"dialect", "close", "ping", "on_agent_change", "__enter__", "__exit__"}
    assert protocol_members(Datastore) == kinds | lifecycle
    assert len(kinds) == 72


def test_the_first_name_of_the_store_still_opens_it(datastore_url: str) -> None:
    assert ca.datastore.Datastore is ca.datastore.store.Datastore is SqlDatastore
    with ca.datastore.Datastore.open(datastore_url) as store:
        assert store.current_revision() == 0


# -- schema and migrations --------------------------------------------------------


def test_migrations_reach_head_once_and_rerunning_them_changes_nothing(datastore_url: str) -> None:
    store = open_datastore(datastore_url)
    store.create_entry(new_entry())
    store.bump_bundle_sequence()
    store.close()

    engine = sa.create_engine(datastore_url)
    try:
        assert schema_revision(engine) == head_revision() == "0010"
        upgrade(engine)  # applied again: a no-op
        with engine.connect() as conn:
            versions = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
        assert [tuple(v) for v in versions] == [("0010",)]
    finally:
        engine.dispose()

    reopened = open_datastore(datastore_url)  # and once more through open()
    try:
        assert reopened.count_entries() == 1
        assert reopened.current_revision() == 1
        assert reopened.bundle_sequence() == 1
    finally:
        reopened.close()


def test_an_upgrade_from_the_first_schema_keeps_every_row(datastore_url: str) -> None:
    """What a 0001 database holds (entries, agents, aliases, tokens, the CA journal, issued
    SVIDs, counters) comes through every migration since unchanged: written at head, taken
    down to 0001 with the migrations' own downgrades, then opened (upgraded) again."""
    clock = ManualClock(START)
    with open_datastore(datastore_url, clock=clock) as store:
        entry = store.create_entry(new_entry(dns_names=("web.example.org",), x509_svid_ttl=60,
                                             federates_with=("partner.org",), hint="web"))
        store.register_agent(AGENT, attestation_type="x509pop", serial="0a",
                           expires_at=START + timedelta(hours=1), selectors=(sel("x509pop:a"),))
        store.add_agent_alias(AGENT, f"{TD}/node/a")
        store.create_join_token("t" * 32, alias_id=f"{TD}/node/b",
                                expires_at=START + timedelta(minutes=10))
        store.add_authority(authority("ab12", status="active"))
        store.record_issued_svids([svid("0f")])
        store.bump_bundle_sequence()
        before = (store.list_entries(), store.get_agent(AGENT), store.agent_aliases(AGENT),
                  store.list_join_tokens(), store.list_authorities(), store.count_issued_svids(),
                  store.current_revision(), store.bundle_sequence())  # fmt: skip

    engine = sa.create_engine(datastore_url)
    try:
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0001")
        assert schema_revision(engine) == "0001"
    finally:
        engine.dispose()

    with open_datastore(datastore_url, clock=clock) as upgraded:
        after = (upgraded.list_entries(), upgraded.get_agent(AGENT),
                 upgraded.agent_aliases(AGENT), upgraded.list_join_tokens(),
                 upgraded.list_authorities(), upgraded.count_issued_svids(),
                 upgraded.current_revision(), upgraded.bundle_sequence())  # fmt: skip
        assert schema_revision_of(datastore_url) == head_revision()
    assert after == before
    assert after[0] == [entry]


def schema_revision_of(url: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        return schema_revision(engine)
    finally:
        engine.dispose()


def test_servers_starting_together_migrate_one_at_a_time(datastore_url: str) -> None:
    opened: list[Datastore] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            opened.append(open_datastore(datastore_url))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in opened:
        store.close()
    assert errors == []
    assert len(opened) == 4


def test_models_and_migrations_describe_the_same_schema(
    store: Datastore, datastore_url: str
) -> None:
    engine = sa.create_engine(datastore_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "version_table": VERSION_TABLE}
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_a_schema_newer_than_this_tessera_is_refused(datastore_url: str) -> None:
    open_datastore(datastore_url).close()
    engine = sa.create_engine(datastore_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    finally:
        engine.dispose()
    with pytest.raises(FailedPrecondition) as caught:
        open_datastore(datastore_url)
    assert caught.value.message.startswith("the datastore schema cannot be upgraded: ")
    assert "'9999'" in caught.value.message
    assert caught.value.message.endswith(
        "if a newer Tessera has used this database, run that version (or restore a backup)"
    )


def test_data_survives_a_restart(datastore_url: str, clock: ManualClock) -> None:
    store = open_datastore(datastore_url, clock=clock)
    entry = store.create_entry(new_entry(dns_names=("web.example.org",), hint="web"))
    store.register_agent(
        AGENT, attestation_type="x509pop", serial="0a", expires_at=START + timedelta(hours=1)
    )
    store.add_agent_alias(AGENT, f"{TD}/cluster/a")
    store.create_join_token("tok", alias_id=f"{TD}/node", expires_at=START + timedelta(minutes=10))
    store.add_authority(authority("ab12"))
    store.set_federated_bundle("other.org", b'{"keys": []}')
    store.record_issued_svids([svid("01")])
    store.append_audit(actor="admin", action="entry.create", target=entry.id)
    store.close()

    with open_datastore(datastore_url, clock=clock) as again:
        assert again.get_entry(entry.id) == entry
        assert again.current_revision() == 2
        assert again.get_agent(AGENT).serial == "0a"
        assert again.agent_aliases(AGENT) == {f"{TD}/cluster/a"}
        assert [t.token for t in again.list_join_tokens()] == ["tok"]
        assert again.get_authority("ab12") == authority("ab12")
        assert again.get_federated_bundle("other.org").bundle == b'{"keys": []}'
        assert again.count_issued_svids() == 1
        assert [e.action for e in again.list_audit()] == ["entry.create"]


# -- registration entries ---------------------------------------------------------


def test_entry_create_get_update_delete(store: Datastore, clock: ManualClock) -> None:
    created = store.create_entry(
        new_entry(
            selectors=("unix:uid:1000", "docker:label:app:web", "unix:uid:1000"),
            x509_svid_ttl=3600,
            jwt_svid_ttl=300,
            dns_names=("web.example.org", "a.example.org"),
            federates_with=("other.org",),
            admin=True,
            downstream=False,
            node=False,
            hint="web",
            expires_at=1_900_000_000,
        )
    )
    assert created.selectors == (sel("docker:label:app:web"), sel("unix:uid:1000"))
    assert created.dns_names == ("web.example.org", "a.example.org")
    assert created.revision == 1
    assert created.created_at == START
    assert created.deleted is False
    assert store.get_entry(created.id) == created

    clock.advance(timedelta(minutes=5))
    changed = replace(as_new_entry(created), selectors=(sel("unix:uid:0"),), admin=False, hint="")
    updated = store.update_entry(created.id, changed)
    assert updated.revision == 2
    assert updated.created_at == START
    assert updated.selectors == (sel("unix:uid:0"),)
    assert (updated.admin, updated.hint) == (False, "")
    assert store.get_entry(created.id) == updated

    tombstone = store.delete_entry(created.id)
    assert tombstone == replace(updated, deleted=True, revision=3)
    with pytest.raises(NotFound) as caught:
        store.get_entry(created.id)
    assert caught.value.message == (
        f"registration entry {created.id} not found; list entries to see their IDs"
    )
    with pytest.raises(NotFound):
        store.update_entry(created.id, changed)
    with pytest.raises(NotFound):
        store.delete_entry(created.id)
    assert store.count_entries() == 0
    assert store.list_entries() == []


def test_an_entry_is_unique_by_spiffe_id_parent_and_selector_set(store: Datastore) -> None:
    first = store.create_entry(new_entry(selectors=("unix:uid:1", "unix:gid:1")))
    with pytest.raises(AlreadyExists) as caught:
        store.create_entry(new_entry(selectors=("unix:gid:1", "unix:uid:1"), hint="other"))
    assert caught.value.message == (
        f"an entry with SPIFFE ID {TD}/web, parent ID {AGENT} and the same selectors exists "
        f"already; update that entry or use different selectors (entry {first.id})"
    )
    # Any difference makes another entry.
    store.create_entry(new_entry(selectors=("unix:uid:1",)))
    store.create_entry(new_entry(selectors=("unix:uid:1", "unix:gid:1"), parent=f"{TD}/other"))
    second = store.create_entry(new_entry("api", selectors=("unix:uid:1", "unix:gid:1")))
    # Updating one into another's identity is refused, and changes nothing.
    with pytest.raises(AlreadyExists):
        store.update_entry(second.id, as_new_entry(first))
    assert store.get_entry(second.id) == second
    # Updating an entry to itself is fine; a deleted entry's identity is free again.
    store.update_entry(first.id, as_new_entry(first))
    store.delete_entry(first.id)
    again = store.create_entry(new_entry(selectors=("unix:uid:1", "unix:gid:1")))
    assert again.id != first.id


def test_a_failed_write_leaves_nothing_behind(store: Datastore) -> None:
    store.create_entry(new_entry())
    before = (store.count_entries(), store.current_revision())

    with pytest.raises(AlreadyExists):
        store.create_entry(new_entry())
    with pytest.raises(NotFound):
        store.update_entry("no-such-entry", new_entry("api"))
    assert (store.count_entries(), store.current_revision()) == before
    assert store.entries_changed_since(before[1]) == []

    # A batch with one repeated serial records none of it.
    store.record_issued_svids([svid("01")])
    with pytest.raises(AlreadyExists) as caught:
        store.record_issued_svids([svid("02"), svid("03"), svid("01")])
    assert caught.value.message == (
        "an SVID with one of these serial numbers is recorded already; serials must be unique"
    )
    with pytest.raises(AlreadyExists):
        store.record_issued_svids([svid("04"), svid("04")])
    assert store.count_issued_svids() == 1

    # A value refused half-way through an upsert leaves the agent untouched.
    store.register_agent(AGENT, attestation_type="x509pop", serial="01", expires_at=START)
    naive = datetime(2030, 1, 2)
    with pytest.raises(InvalidArgument) as refused:
        store.update_agent_serial(AGENT, "02", naive)
    assert refused.value.message == (
        "the datastore refused a value: naive datetime given to the datastore; pass a UTC-aware one"
    )
    assert store.get_agent(AGENT).serial == "01"


def test_list_entries_filters(store: Datastore, clock: ManualClock) -> None:
    # Listed oldest first (ties in created_at go by ID): move the clock between creates.
    web = store.create_entry(new_entry("web", selectors=("unix:uid:1", "unix:gid:1")))
    clock.advance(timedelta(seconds=1))
    api = store.create_entry(new_entry("api", selectors=("unix:uid:1",)))
    clock.advance(timedelta(seconds=1))
    db = store.create_entry(
        new_entry("db", parent=f"{TD}/other", selectors=("unix:uid:1", "unix:gid:1", "k8s:ns:db"))
    )
    gone = store.create_entry(new_entry("gone", selectors=("unix:uid:1",)))
    store.delete_entry(gone.id)

    def ids(**kw: object) -> list[str]:
        return [e.spiffe_id.rsplit("/", 1)[1] for e in store.list_entries(**kw)]  # type: ignore[arg-type]

    assert ids() == ["web", "api", "db"]
    assert ids(spiffe_id=f"{TD}/api") == ["api"]
    assert ids(parent_id=f"{TD}/other") == ["db"]
    uid_gid = [sel("unix:gid:1"), sel("unix:uid:1")]
    assert ids(selectors=uid_gid, selector_match="exact") == ["web"]
    assert ids(selectors=uid_gid, selector_match="subset") == ["web", "api"]
    assert ids(selectors=uid_gid, selector_match="superset") == ["web", "db"]
    assert ids(selectors=uid_gid) == ["web", "db"]  # superset is the default
    assert ids(selectors=[sel("k8s:ns:db"), sel("x:y")], selector_match="any") == ["db"]
    assert ids(selectors=[sel("x:y")], selector_match="any") == []
    assert ids(selectors=uid_gid, selector_match="subset", parent_id=AGENT) == ["web", "api"]
    assert ids(limit=2) == ["web", "api"]
    assert ids(limit=2, offset=2) == ["db"]
    assert store.count_entries() == 3
    assert {e.id for e in store.list_entries()} == {web.id, api.id, db.id}

    with pytest.raises(InvalidArgument) as caught:
        store.list_entries(selectors=uid_gid, selector_match="some")
    assert caught.value.message == (
        "selector match 'some' is not one of exact, subset, superset, any"
    )
    with pytest.raises(InvalidArgument) as caught:
        store.list_entries(selectors=[])
    assert caught.value.message == "filtering by selectors needs at least one selector"


def test_entries_by_parent(store: Datastore, clock: ManualClock) -> None:
    mine = store.create_entry(new_entry("web"))
    clock.advance(timedelta(seconds=1))
    by_alias = store.create_entry(new_entry("api", parent=f"{TD}/cluster/a"))
    store.create_entry(new_entry("db", parent=f"{TD}/someone-else"))
    gone = store.create_entry(new_entry("gone"))
    store.delete_entry(gone.id)

    assert store.entries_by_parent({AGENT, f"{TD}/cluster/a"}) == [mine, by_alias]
    assert store.entries_by_parent([AGENT]) == [mine]
    assert store.entries_by_parent(set()) == []
    # More parent IDs than one query takes.
    many = [f"{TD}/node-{i}" for i in range(1200)] + [f"{TD}/cluster/a"]
    assert store.entries_by_parent(many) == [by_alias]


def test_incremental_sync_by_revision(store: Datastore) -> None:
    assert store.current_revision() == 0
    assert store.entries_changed_since(0) == []
    a = store.create_entry(new_entry("a"))
    b = store.create_entry(new_entry("b"))
    c = store.create_entry(new_entry("c"))
    seen = store.current_revision()
    assert seen == 3

    b2 = store.update_entry(b.id, replace(as_new_entry(b), hint="changed"))
    a_gone = store.delete_entry(a.id)
    assert store.current_revision() == 5
    assert store.entries_changed_since(seen) == [b2, a_gone]
    assert [e.revision for e in store.entries_changed_since(0)] == [3, 4, 5]
    assert store.entries_changed_since(0)[0] == c
    assert store.entries_changed_since(5) == []

    c_gone = store.delete_entry(c.id)
    assert store.purged_revision() == 0
    assert store.purge_tombstones(before_revision=6) == 1  # a's tombstone, not c's
    assert store.purged_revision() == 6
    assert store.entries_changed_since(0) == [b2, c_gone]
    assert store.purge_tombstones(before_revision=3) == 0
    assert store.purged_revision() == 6  # never goes back
    assert store.current_revision() == 6  # purging is not a change to the entries


def test_concurrent_writers_get_distinct_revisions_in_order(datastore_url: str) -> None:
    first = open_datastore(datastore_url)
    second = open_datastore(datastore_url)  # as a second server process would
    errors: list[BaseException] = []

    def create(store: Datastore, worker: int) -> None:
        try:
            for i in range(10):
                store.create_entry(new_entry(f"w{worker}-{i}"))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [
        threading.Thread(target=create, args=(s, n)) for n, s in enumerate([first, second] * 3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        revisions = [e.revision for e in first.entries_changed_since(0)]
        assert revisions == list(range(1, 61))
        assert second.current_revision() == 60
    finally:
        first.close()
        second.close()


# -- the mesh configuration ------------------------------------------------------

USERS = """\
apiVersion: tessera.io/v1alpha1
kind: Service
metadata: {name: users}
spec:
  spiffeIds: [spiffe://example.org/users]
  ports: [{number: 80, name: http, protocol: HTTP}]
"""
USERS_ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: users}
spec:
  hosts: [users]
  http:
  - route: [{destination: {host: users}}]
"""
USERS_ROUTE_WITH_TIMEOUT = USERS_ROUTE + "    timeout: 2s\n"
ORDERS_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: orders}
spec:
  host: orders
  subsets: [{name: v1, labels: {version: v1}}]
"""
USERS_SUBSET_ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: users}
spec:
  hosts: [users]
  http:
  - route: [{destination: {host: users, subset: v2}}]
"""


def mesh_input(*texts: str) -> list[Resource]:
    return parse_documents("---\n".join(texts), source="mesh.yaml")


def actions(result: MeshApplyResult) -> list[str]:
    return [str(change) for change in result.changes]


def test_a_new_store_has_an_empty_mesh_configuration(store: Datastore) -> None:
    assert store.mesh_config() == (Config(), 0)
    assert store.mesh_revision() == 0
    assert store.list_mesh_resources() == []
    assert store.mesh_changed_since(0) == MeshChanges(0, (), full=True)
    assert store.mesh_purged_revision() == 0


def test_an_apply_creates_then_configures_or_leaves_each_resource_unchanged(
    store: Datastore, clock: ManualClock
) -> None:
    first = store.apply_mesh(mesh_input(USERS, USERS_ROUTE))
    assert actions(first) == ["Service users created", "VirtualService users created"]
    assert first.revision == 1
    service = store.get_mesh_resource("Service", "users")
    assert service == MeshResource(
        kind="Service", name="users", document=mesh_input(USERS)[0].to_document(),
        revision=1, created_at=START, updated_at=START,
    )
    assert service.document["spec"]["ports"] == [{"number": 80, "protocol": "HTTP", "name": "http"}]

    clock.advance(timedelta(minutes=5))
    again = store.apply_mesh(mesh_input(USERS, USERS_ROUTE))
    assert actions(again) == ["Service users unchanged", "VirtualService users unchanged"]
    assert (again.revision, again.changed) == (1, ())
    assert store.mesh_revision() == 1  # nothing changed: no revision, agents stay asleep

    changed = store.apply_mesh(mesh_input(USERS, USERS_ROUTE_WITH_TIMEOUT))
    assert actions(changed) == ["Service users unchanged", "VirtualService users configured"]
    assert changed.revision == 2
    route = store.get_mesh_resource("VirtualService", "users")
    assert (route.revision, route.created_at, route.updated_at) == (
        2, START, START + timedelta(minutes=5))
    assert route.document["spec"]["http"][0]["timeout"] == "2s"
    assert store.get_mesh_resource("Service", "users").revision == 1  # not rewritten
    config, revision = store.mesh_config()
    assert revision == 2
    assert config.to_documents() == [r.to_document() for r in mesh_input(
        USERS_ROUTE_WITH_TIMEOUT, USERS)]  # by kind in Tessera's order, then by name
    assert [(r.kind, r.name) for r in store.list_mesh_resources()] == [
        ("VirtualService", "users"), ("Service", "users")]  # Tessera's order of kinds
    assert [r.name for r in store.list_mesh_resources("Service")] == ["users"]
    assert store.sync_counters()[3] == 2


def test_an_apply_is_one_audit_event_naming_each_change(store: Datastore) -> None:
    store.apply_mesh(mesh_input(USERS), audited_by="admin")
    store.apply_mesh(mesh_input(USERS, USERS_ROUTE), audited_by="admin")
    store.apply_mesh(mesh_input(USERS, USERS_ROUTE), audited_by="admin")  # nothing changes
    store.apply_mesh(mesh_input(USERS, USERS_ROUTE_WITH_TIMEOUT))  # not audited
    events = store.list_audit()
    assert [(e.actor, e.action, e.target, e.details) for e in reversed(events)] == [
        ("admin", "mesh.apply", "Service users",
         {"revision": 1, "changes": [
             {"kind": "Service", "name": "users", "action": "created"}]}),
        ("admin", "mesh.apply", "VirtualService users",
         {"revision": 2, "changes": [
             {"kind": "VirtualService", "name": "users", "action": "created"}]}),
    ]
    assert store.verify_audit().intact


def test_an_apply_with_any_problem_stores_nothing(store: Datastore) -> None:
    store.apply_mesh(mesh_input(USERS))
    good_and_bad = mesh_input(USERS_ROUTE, ORDERS_RULE, USERS.replace("80", "8080"))
    with pytest.raises(MeshConfigError) as caught:
        store.apply_mesh(good_and_bad, audited_by="admin")
    assert [str(e) for e in caught.value.errors] == [
        "DestinationRule orders: spec.host: host orders names no Service"]
    assert store.mesh_revision() == 1
    assert [(r.kind, r.name, r.revision) for r in store.list_mesh_resources()] == [
        ("Service", "users", 1)]
    assert store.mesh_changed_since(1) == MeshChanges(1, ())
    assert store.list_audit() == []


def test_an_input_naming_a_resource_twice_is_refused(store: Datastore) -> None:
    with pytest.raises(MeshConfigError) as caught:
        store.apply_mesh([*mesh_input(USERS), *mesh_input(USERS)])
    assert [str(e) for e in caught.value.errors] == [
        "Service users is defined twice in this apply"]
    assert store.mesh_revision() == 0


def test_a_dry_run_says_what_would_change_and_stores_nothing(store: Datastore) -> None:
    store.apply_mesh(mesh_input(USERS))
    result = store.apply_mesh(mesh_input(USERS, USERS_ROUTE), dry_run=True, audited_by="admin")
    assert result == MeshApplyResult(1, tuple(Change(*c) for c in (
        ("Service", "users", "unchanged"), ("VirtualService", "users", "created"))),
        dry_run=True)
    assert store.mesh_revision() == 1
    assert [r.kind for r in store.list_mesh_resources()] == ["Service"]
    assert store.list_audit() == []
    with pytest.raises(MeshConfigError):  # a dry run refuses what an apply would
        store.apply_mesh(mesh_input(USERS_SUBSET_ROUTE), dry_run=True)


def test_a_delete_leaves_a_tombstone_at_a_new_revision(
    store: Datastore, clock: ManualClock
) -> None:
    store.apply_mesh(mesh_input(USERS, USERS_ROUTE))
    clock.advance(timedelta(minutes=1))
    tombstone = store.delete_mesh_resource("VirtualService", "users", audited_by="admin")
    assert (tombstone.kind, tombstone.name, tombstone.revision, tombstone.deleted) == (
        "VirtualService", "users", 2, True)
    assert tombstone.updated_at == START + timedelta(minutes=1)
    assert store.mesh_changed_since(1) == MeshChanges(2, (tombstone,))
    assert store.mesh_changed_since(2) == MeshChanges(2, ())
    everything = store.mesh_changed_since(0)  # a reader starting afresh needs no tombstone
    assert (everything.full, [r.kind for r in everything.resources]) == (True, ["Service"])
    with pytest.raises(NotFound) as caught:
        store.get_mesh_resource("VirtualService", "users")
    assert caught.value.message == (
        "VirtualService users does not exist; 'tessera mesh get virtualservice' lists the "
        "VirtualServices there are")
    event = store.list_audit()[0]
    assert (event.action, event.target, event.details) == (
        "mesh.delete", "VirtualService users", {"revision": 2})
    assert store.mesh_config()[0].to_documents() == [mesh_input(USERS)[0].to_document()]

    clock.advance(timedelta(minutes=1))
    again = store.apply_mesh(mesh_input(USERS_ROUTE))  # over its tombstone
    assert actions(again) == ["VirtualService users created"]
    revived = store.get_mesh_resource("VirtualService", "users")
    assert (revived.revision, revived.created_at, revived.deleted) == (
        3, START + timedelta(minutes=2), False)


def test_a_delete_is_refused_while_something_refers_to_it(store: Datastore) -> None:
    store.apply_mesh(mesh_input(USERS, USERS_ROUTE))
    with pytest.raises(MeshConfigError) as caught:
        store.delete_mesh_resource("Service", "users", audited_by="admin")
    assert [str(e) for e in caught.value.errors] == [
        "VirtualService users: spec.hosts[0]: host users names no Service; a VirtualService "
        "for the mesh routes the calls made to a Service (to route a gateway's requests, name "
        "the gateway in spec.gateways)",
        "VirtualService users: spec.http[0].route[0].destination.host: host users names no "
        "Service",
    ]
    assert store.mesh_revision() == 1
    assert store.get_mesh_resource("Service", "users").deleted is False
    assert store.list_audit() == []


def test_deleting_what_does_not_exist_is_not_found(store: Datastore) -> None:
    with pytest.raises(NotFound) as caught:
        store.delete_mesh_resource("DestinationRule", "users")
    assert caught.value.message == (
        "DestinationRule users does not exist; 'tessera mesh get destinationrule' lists the "
        "DestinationRules there are")
    with pytest.raises(InvalidArgument) as unknown:
        store.delete_mesh_resource("Pod", "users")
    assert unknown.value.message == (
        "'Pod' is not a mesh kind; one of Gateway, VirtualService, DestinationRule, "
        "AuthorizationPolicy, RequestAuthentication, Service, RateLimit")
    assert store.mesh_revision() == 0


def test_changes_since_a_revision_are_what_changed_after_it_in_order(store: Datastore) -> None:
    store.apply_mesh(mesh_input(USERS))                               # 1
    store.apply_mesh(mesh_input(USERS_ROUTE))                         # 2
    store.apply_mesh(mesh_input(USERS_ROUTE_WITH_TIMEOUT))            # 3
    store.delete_mesh_resource("VirtualService", "users")             # 4
    store.apply_mesh(mesh_input(USERS.replace("80", "8080")))         # 5

    def seen(since: int) -> list[tuple[str, int, bool]]:
        return [(r.kind, r.revision, r.deleted) for r in store.mesh_changed_since(since).resources]

    assert seen(1) == [("VirtualService", 4, True), ("Service", 5, False)]
    assert seen(3) == [("VirtualService", 4, True), ("Service", 5, False)]
    assert seen(4) == [("Service", 5, False)]
    assert seen(5) == []
    assert store.mesh_changed_since(5).full is False
    # A revision this store never reached (another database): everything, to replace.
    assert store.mesh_changed_since(9) == MeshChanges(
        5, (store.get_mesh_resource("Service", "users"),), full=True)


def test_purged_tombstones_send_an_older_reader_everything(store: Datastore) -> None:
    store.apply_mesh(mesh_input(USERS, USERS_ROUTE))                  # 1
    store.delete_mesh_resource("VirtualService", "users")             # 2
    store.apply_mesh(mesh_input(USERS.replace("80", "8080")))         # 3
    assert store.purge_mesh_tombstones(before_revision=2) == 0        # the tombstone is at 2
    assert store.purge_mesh_tombstones(before_revision=3) == 1
    assert store.mesh_purged_revision() == 3
    assert store.purge_mesh_tombstones(before_revision=1) == 0
    assert store.mesh_purged_revision() == 3  # never goes back
    behind = store.mesh_changed_since(1)  # may have missed the delete: gets everything
    assert (behind.full, [(r.kind, r.revision) for r in behind.resources]) == (
        True, [("Service", 3)])
    assert store.mesh_changed_since(3) == MeshChanges(3, ())
    assert store.mesh_revision() == 3  # purging is not a change
    assert store.current_revision() == 0  # nor is any of it an entry change


def test_servers_on_one_database_see_each_others_mesh_changes(datastore_url: str) -> None:
    with open_datastore(datastore_url) as first, open_datastore(datastore_url) as second:
        first.apply_mesh(mesh_input(USERS))
        assert first.mesh_config()[1] == 1  # the first server now holds revision 1's config
        second.apply_mesh(mesh_input(USERS_ROUTE))
        config, revision = first.mesh_config()
        assert revision == 2
        assert [r.key for r in config] == [("VirtualService", "users"), ("Service", "users")]
        assert actions(first.apply_mesh(mesh_input(USERS_ROUTE))) == [
            "VirtualService users unchanged"]


def test_a_concurrent_delete_waits_for_an_apply_and_sees_its_references(
    datastore_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server A applies a VirtualService routing to Service users while server B deletes
    that Service. B's delete must not read the configuration before A's apply ends, or
    both would succeed and leave a route to nothing."""
    with open_datastore(datastore_url) as first, open_datastore(datastore_url) as second:
        first.apply_mesh(mesh_input(USERS))
        loaded, release, second_loaded = threading.Event(), threading.Event(), threading.Event()
        first_read = first._stored_config  # type: ignore[attr-defined]
        second_read = second._stored_config  # type: ignore[attr-defined]

        def first_holds(*args: Any) -> Any:
            config = first_read(*args)
            loaded.set()
            release.wait(10)
            return config

        def second_reads(*args: Any) -> Any:
            second_loaded.set()
            return second_read(*args)

        monkeypatch.setattr(first, "_stored_config", first_holds)
        monkeypatch.setattr(second, "_stored_config", second_reads)
        outcomes: dict[str, Any] = {}

        def run(name: str, call: Any) -> None:
            try:
                outcomes[name] = call()
            except BaseException as error:
                outcomes[name] = error

        applying = threading.Thread(target=run, args=(
            "apply", lambda: first.apply_mesh(mesh_input(USERS_ROUTE))))
        applying.start()
        assert loaded.wait(10)
        deleting = threading.Thread(target=run, args=(
            "delete", lambda: second.delete_mesh_resource("Service", "users")))
        deleting.start()
        # B must be held before it reads the configuration while A's transaction is open.
        # Waiting for something that must not happen can only be bounded by time.
        assert not second_loaded.wait(0.5)
        release.set()
        applying.join(20)
        deleting.join(20)

    assert actions(outcomes["apply"]) == ["VirtualService users created"]
    assert isinstance(outcomes["delete"], MeshConfigError)
    assert str(outcomes["delete"].errors[0]).startswith("VirtualService users: spec.hosts[0]")


# -- agents -----------------------------------------------------------------------


def test_agents(store: Datastore, clock: ManualClock) -> None:
    expires = START + timedelta(hours=1)
    agent = store.register_agent(
        AGENT,
        attestation_type="x509pop",
        serial="0a",
        expires_at=expires,
        selectors=[sel("x509pop:subject:cn:node-1"), sel("x509pop:ca:fp:ab")],
    )
    assert agent.selectors == (sel("x509pop:ca:fp:ab"), sel("x509pop:subject:cn:node-1"))
    assert (agent.banned, agent.created_at, agent.updated_at) == (False, START, START)
    assert store.get_agent(AGENT) == agent

    clock.advance(timedelta(minutes=1))
    renewed = store.update_agent_serial(AGENT, "0b", expires + timedelta(hours=1))
    assert (renewed.serial, renewed.expires_at) == ("0b", expires + timedelta(hours=1))
    assert (renewed.created_at, renewed.updated_at) == (START, START + timedelta(minutes=1))
    assert store.get_agent(AGENT) == renewed
    assert renewed.previous_serial == "0a"  # until the renewed SVID is first used
    store.confirm_agent_serial(AGENT)
    assert store.get_agent(AGENT).previous_serial == ""

    banned = store.set_agent_banned(AGENT, True)
    assert banned.banned is True
    # Attesting again refreshes the agent but keeps it banned and keeps created_at.
    clock.advance(timedelta(minutes=1))
    again = store.register_agent(
        AGENT, attestation_type="x509pop", serial="0c", expires_at=expires, selectors=[sel("a:b")]
    )
    assert (again.serial, again.banned, again.selectors) == ("0c", True, (sel("a:b"),))
    assert again.previous_serial == ""  # attesting again invalidates every older SVID
    assert again.created_at == START
    assert again.updated_at == START + timedelta(minutes=2)
    assert store.set_agent_banned(AGENT, False).banned is False

    other = f"{TD}/tessera/agent/join_token/abc"
    store.register_agent(other, attestation_type="join_token", serial="01", expires_at=expires)
    assert [a.spiffe_id for a in store.list_agents()] == [other, AGENT]
    assert store.count_agents() == 2

    store.delete_agent(AGENT)
    assert store.count_agents() == 1
    with pytest.raises(NotFound) as caught:
        store.get_agent(AGENT)
    assert caught.value.message == f"agent {AGENT} not found; list agents to see the attested ones"
    for call in (
        lambda: store.delete_agent(AGENT),
        lambda: store.update_agent_serial(AGENT, "0d", expires),
        lambda: store.set_agent_banned(AGENT, True),
        lambda: store.add_agent_alias(AGENT, f"{TD}/x"),
    ):
        with pytest.raises(NotFound):
            call()


def test_agent_aliases_change_the_entry_revision(store: Datastore) -> None:
    store.register_agent(AGENT, attestation_type="x509pop", serial="0a", expires_at=START)
    store.create_entry(new_entry())
    assert store.current_revision() == 1
    assert store.agent_aliases(AGENT) == set()

    store.add_agent_alias(AGENT, f"{TD}/cluster/a")
    assert store.current_revision() == 2
    store.add_agent_alias(AGENT, f"{TD}/cluster/a")  # idempotent: no change, no bump
    assert store.current_revision() == 2
    store.add_agent_alias(AGENT, f"{TD}/cluster/b")
    assert store.current_revision() == 3
    assert store.agent_aliases(AGENT) == {f"{TD}/cluster/a", f"{TD}/cluster/b"}
    assert store.agent_aliases(f"{TD}/unknown") == set()

    store.delete_agent(AGENT)  # its aliases go with it: a change too
    assert store.agent_aliases(AGENT) == set()
    assert store.current_revision() == 4

    store.register_agent(AGENT, attestation_type="x509pop", serial="0b", expires_at=START)
    store.delete_agent(AGENT)  # no aliases: no bump
    assert store.current_revision() == 4


# -- join tokens ------------------------------------------------------------------


def test_join_tokens_work_once_and_expire(store: Datastore, clock: ManualClock) -> None:
    soon = START + timedelta(minutes=10)
    created = store.create_join_token("t1", alias_id=f"{TD}/node", expires_at=soon)
    assert created.expires_at == soon
    store.create_join_token("t2", alias_id=None, expires_at=soon + timedelta(minutes=1))
    with pytest.raises(AlreadyExists) as duplicate:
        store.create_join_token("t1", alias_id=None, expires_at=soon)
    assert duplicate.value.message == "this join token exists already; generate another"
    assert [t.token for t in store.list_join_tokens()] == ["t1", "t2"]

    assert store.consume_join_token("t1") == created
    with pytest.raises(NotFound) as used:
        store.consume_join_token("t1")
    assert used.value.message == (
        "join token not found or already used; generate a new one with "
        "'tessera server token generate'"
    )

    clock.set(soon + timedelta(minutes=1))  # t2 expires exactly now
    with pytest.raises(FailedPrecondition) as expired:
        store.consume_join_token("t2")
    assert expired.value.message == (
        "join token expired at 2030-01-01T00:11:00+00:00; generate a new one with "
        "'tessera server token generate'"
    )
    assert store.list_join_tokens() == []  # the expired token is gone too
    with pytest.raises(NotFound):
        store.consume_join_token("t2")

    store.create_join_token("old", alias_id=None, expires_at=clock.now() - timedelta(seconds=1))
    store.create_join_token("new", alias_id=None, expires_at=clock.now() + timedelta(seconds=1))
    assert store.prune_join_tokens() == 1
    assert [t.token for t in store.list_join_tokens()] == ["new"]


def test_a_join_token_is_consumed_once_under_contention(
    datastore_url: str, clock: ManualClock
) -> None:
    stores = [open_datastore(datastore_url, clock=clock) for _ in range(4)]
    stores[0].create_join_token("race", alias_id=None, expires_at=START + timedelta(minutes=10))
    outcomes: list[str] = []
    lock = threading.Lock()

    def consume(store: Datastore) -> None:
        try:
            store.consume_join_token("race")
            result = "won"
        except (NotFound, FailedPrecondition) as error:
            result = type(error).__name__
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=consume, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert sorted(outcomes) == ["NotFound", "NotFound", "NotFound", "won"]


def test_registering_an_agent_redeems_its_join_token_in_the_same_transaction(
    store: Datastore, clock: ManualClock
) -> None:
    agent_id = f"{TD}/tessera/agent/join_token/tok-1"
    store.create_join_token("tok-1", alias_id=f"{TD}/node/a", expires_at=START + timedelta(hours=1))
    found = store.find_join_token("tok-1")
    assert found.alias_id == f"{TD}/node/a"
    assert store.find_join_token("tok-1") == found, "finding does not use the token up"

    def register(token: str) -> None:
        store.register_agent(
            agent_id, attestation_type="join_token", serial="0a",
            expires_at=START + timedelta(hours=1), aliases=(f"{TD}/node/a",), join_token=token,
            audit=AuditNote(actor=agent_id, action="agent.attest", target=agent_id),
        )

    revision = store.current_revision()
    register("tok-1")
    assert store.get_agent(agent_id).serial == "0a"
    assert store.agent_aliases(agent_id) == {f"{TD}/node/a"}
    assert store.current_revision() == revision + 1, "a new alias moves the entry revision"
    assert [e.action for e in store.list_audit()] == ["agent.attest"]
    assert store.list_join_tokens() == []
    with pytest.raises(NotFound) as used:
        register("tok-1")
    assert used.value.message == (
        "join token not found or already used; generate a new one with "
        "'tessera server token generate'"
    )
    with pytest.raises(NotFound):
        store.find_join_token("tok-1")

    # A refused registration leaves nothing behind: no agent, no alias, no audit event.
    store.delete_agent(agent_id)
    store.create_join_token("tok-2", alias_id=None, expires_at=START + timedelta(minutes=1))
    clock.set(START + timedelta(minutes=1))
    with pytest.raises(FailedPrecondition) as expired:
        store.find_join_token("tok-2")
    assert expired.value.message == (
        "join token expired at 2030-01-01T00:01:00+00:00; generate a new one with "
        "'tessera server token generate'"
    )
    with pytest.raises(FailedPrecondition):
        register("tok-2")
    with pytest.raises(NotFound):
        store.get_agent(agent_id)
    assert [e.action for e in store.list_audit()] == ["agent.attest"]


def test_one_join_token_registers_one_agent_under_contention(
    datastore_url: str, clock: ManualClock
) -> None:
    stores = [open_datastore(datastore_url, clock=clock) for _ in range(4)]
    stores[0].create_join_token("race", alias_id=None, expires_at=START + timedelta(minutes=10))
    outcomes: list[str] = []
    lock = threading.Lock()

    def register(index: int, store: Datastore) -> None:
        try:
            store.register_agent(
                f"{TD}/tessera/agent/{index}", attestation_type="join_token", serial="01",
                expires_at=START + timedelta(hours=1), join_token="race",
            )
            result = "won"
        except (NotFound, FailedPrecondition) as error:
            result = type(error).__name__
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=register, args=pair) for pair in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stores[0].count_agents() == 1
    for store in stores:
        store.close()
    assert sorted(outcomes) == ["NotFound", "NotFound", "NotFound", "won"]


# -- CA journal -------------------------------------------------------------------


def test_ca_journal(store: Datastore) -> None:
    x1 = store.add_authority(authority("aa01", status="active"))
    assert x1 == authority("aa01", status="active")
    x2 = store.add_authority(authority("aa02", not_before=START + timedelta(hours=12)))
    j1 = store.add_authority(authority("kid-1", kind="jwt", certificate=None, server_id="server-b"))
    with pytest.raises(AlreadyExists) as caught:
        store.add_authority(authority("aa01"))
    assert caught.value.message == "authority aa01 is in the CA journal already"
    with pytest.raises(InvalidArgument) as caught_kind:
        store.add_authority(authority("bad", kind="ssh"))
    assert caught_kind.value.message == "authority kind 'ssh' is not one of x509, jwt"

    assert store.get_authority("kid-1") == j1
    assert store.list_authorities() == [j1, x1, x2]
    assert store.list_authorities(kind="x509") == [x1, x2]
    assert store.list_authorities(server_id="server-b") == [j1]

    assert store.set_authority_status("aa02", "active").status == "active"
    assert store.set_authority_status("aa01", "old").status == "old"
    with pytest.raises(InvalidArgument) as caught_status:
        store.set_authority_status("aa01", "retired")
    assert caught_status.value.message == (
        "authority status 'retired' is not one of prepared, active, old"
    )
    assert store.set_authority_tainted("aa01").tainted is True
    revoked = store.set_authority_revoked("aa01")
    assert (revoked.revoked, revoked.tainted, revoked.status) == (True, True, "old")
    assert [a.authority_id for a in store.list_authorities(kind="x509")] == ["aa02"]
    assert [a.authority_id for a in store.list_authorities(kind="x509", include_revoked=True)] == [
        "aa01",
        "aa02",
    ]

    store.delete_authority("aa01")
    with pytest.raises(NotFound) as missing:
        store.get_authority("aa01")
    assert missing.value.message == "authority aa01 is not in the CA journal"
    for call in (
        lambda: store.delete_authority("aa01"),
        lambda: store.set_authority_status("aa01", "old"),
        lambda: store.set_authority_tainted("aa01"),
        lambda: store.set_authority_revoked("aa01"),
    ):
        with pytest.raises(NotFound):
            call()

    assert store.bundle_sequence() == 0
    assert [store.bump_bundle_sequence() for _ in range(3)] == [1, 2, 3]
    assert store.bundle_sequence() == 3


# -- federated bundles, issued SVIDs, audit ---------------------------------------


def test_federated_bundles(store: Datastore, clock: ManualClock) -> None:
    first = store.set_federated_bundle("other.org", b'{"keys": [1]}')
    assert (first.bundle, first.updated_at) == (b'{"keys": [1]}', START)
    clock.advance(timedelta(hours=1))
    second = store.set_federated_bundle("other.org", b'{"keys": [2]}')
    assert second.updated_at == START + timedelta(hours=1)
    assert store.get_federated_bundle("other.org") == second
    store.set_federated_bundle("a.org", b"{}")
    assert [b.trust_domain for b in store.list_federated_bundles()] == ["a.org", "other.org"]

    store.delete_federated_bundle("other.org")
    with pytest.raises(NotFound) as caught:
        store.get_federated_bundle("other.org")
    assert caught.value.message == "no bundle is stored for trust domain other.org"
    with pytest.raises(NotFound):
        store.delete_federated_bundle("other.org")


def test_issued_svids(store: Datastore) -> None:
    store.record_issued_svids([])
    assert store.count_issued_svids() == 0
    batch = [svid(f"{i:04x}", expires_at=START + timedelta(minutes=i)) for i in range(1, 501)]
    store.record_issued_svids(batch)
    store.record_issued_svids([svid("jwt-1", kind="jwt", agent_id=None)])
    assert store.count_issued_svids() == 501
    with pytest.raises(InvalidArgument):
        store.record_issued_svids([svid("x", kind="ssh")])
    assert store.prune_issued_svids(START + timedelta(minutes=11)) == 10
    assert store.count_issued_svids() == 491


def test_issued_svids_and_their_audit_event_are_written_together(store: Datastore) -> None:
    note = AuditNote(actor=AGENT, action="x509svid.issue", target=AGENT,
                     details={"svids": [{"serial": "0a"}]})  # fmt: skip
    store.record_issued_svids([svid("0a")], audit=note)
    with pytest.raises(AlreadyExists):
        store.record_issued_svids([svid("0b"), svid("0a")], audit=note)

    assert store.count_issued_svids() == 1
    [event] = store.list_audit()
    assert (event.actor, event.action, event.details) == (
        AGENT, "x509svid.issue", {"svids": [{"serial": "0a"}]})  # fmt: skip
    assert store.verify_audit() == AuditVerification(1)


def test_issued_svids_of_a_group_are_written_with_an_audit_event_per_note(
    store: Datastore,
) -> None:
    notes = [
        AuditNote(actor=AGENT, action="x509svid.issue", target=AGENT,
                  details={"svids": [{"serial": "0a"}, {"serial": "0b"}]}),
        AuditNote(actor=OTHER, action="x509svid.issue", target=OTHER,
                  details={"svids": [{"serial": "0c"}]}),
    ]  # fmt: skip
    store.record_issued_svids([svid("0a"), svid("0b"), svid("0c", agent_id=OTHER)], audit=notes)
    with pytest.raises(AlreadyExists):
        store.record_issued_svids([svid("0d"), svid("0c")], audit=notes)

    assert store.count_issued_svids() == 3
    assert [(e.actor, e.details) for e in reversed(store.list_audit())] == [
        (note.actor, note.details) for note in notes]
    assert store.verify_audit() == AuditVerification(2)


def test_issued_svids_are_written_only_at_the_entry_revision_they_were_authorized_at(
    store: Datastore,
) -> None:
    note = AuditNote(actor=AGENT, action="x509svid.issue", target=AGENT)
    revision = store.current_revision()
    store.record_issued_svids([svid("0a")], audit=note, revision=revision)
    store.create_entry(new_entry())

    with pytest.raises(RevisionMoved) as moved:
        store.record_issued_svids([svid("0b")], audit=note, revision=revision)

    assert (moved.value.expected, moved.value.revision) == (revision, revision + 1)
    assert moved.value.message == f"the entry revision is {revision + 1}, no longer {revision}"
    assert isinstance(moved.value, FailedPrecondition)
    assert store.count_issued_svids() == 1
    assert [e.action for e in store.list_audit()] == ["x509svid.issue"]
    store.record_issued_svids([svid("0b")], audit=note, revision=revision + 1)
    assert store.count_issued_svids() == 2
    assert store.verify_audit().problem is None


def test_issued_svids_are_stored_as_sqlalchemy_stores_them(
    datastore_url: str, store: Datastore
) -> None:
    # record_issued_svids hands its rows to the driver itself; a row SQLAlchemy inserts
    # must read back the same, expiry included (in another zone, converted to UTC).
    expires = datetime(2030, 1, 1, 13, 0, 5, tzinfo=timezone(timedelta(hours=1)))
    store.record_issued_svids(
        [svid("0a", expires_at=expires), svid("0b", expires_at=expires, agent_id=None)]
    )
    engine = sa.create_engine(datastore_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(IssuedSvidRow.__table__),
                [
                    {
                        "serial": "0c",
                        "spiffe_id": f"{TD}/web",
                        "kind": "jwt",
                        "agent_id": AGENT,
                        "authority_id": "ab12",
                        "expires_at": expires,
                    }
                ],
            )
            raw = conn.execute(
                sa.text(
                    "SELECT serial, spiffe_id, kind, agent_id, authority_id, expires_at "
                    "FROM issued_svids ORDER BY serial"
                )
            ).all()
            typed = conn.execute(
                sa.select(IssuedSvidRow.serial, IssuedSvidRow.expires_at).order_by(
                    IssuedSvidRow.serial
                )
            ).all()
    finally:
        engine.dispose()
    assert [tuple(row[:5]) for row in raw] == [
        ("0a", f"{TD}/web", "x509", AGENT, "ab12"),
        ("0b", f"{TD}/web", "x509", None, "ab12"),
        ("0c", f"{TD}/web", "jwt", AGENT, "ab12"),
    ]
    assert raw[0][5] == raw[1][5] == raw[2][5]
    at = datetime(2030, 1, 1, 12, 0, 5, tzinfo=UTC)
    assert [tuple(row) for row in typed] == [("0a", at), ("0b", at), ("0c", at)]
    assert store.prune_issued_svids(at) == 0
    assert store.prune_issued_svids(at + timedelta(seconds=1)) == 3


def test_record_issued_svids_refuses_a_naive_expiry(store: Datastore) -> None:
    with pytest.raises(InvalidArgument) as refused:
        store.record_issued_svids([svid("01"), svid("02", expires_at=datetime(2030, 1, 2))])
    assert refused.value.message == (
        "the datastore refused a value: naive datetime given to the datastore; pass a UTC-aware one"
    )
    assert store.count_issued_svids() == 0


def test_audit_log(store: Datastore, clock: ManualClock) -> None:
    first = store.append_audit(
        actor="admin", action="entry.create", target="e1", details={"selectors": ["unix:uid:1"]}
    )
    assert (first.at, first.details) == (START, {"selectors": ["unix:uid:1"]})
    clock.advance(timedelta(seconds=1))
    second = store.append_audit(actor=AGENT, action="svid.issue", target=f"{TD}/web")
    assert second.details == {}
    assert second.id > first.id
    assert store.list_audit() == [second, first]
    assert store.list_audit(limit=1) == [second]
    with pytest.raises(InvalidArgument) as caught:
        store.append_audit(actor="a", action="b", target="c", details={"when": START})
    assert caught.value.message == (
        "audit details must be plain JSON values: Object of type datetime is not JSON serializable"
    )
    assert len(store.list_audit()) == 2


def test_times_come_back_in_utc(store: Datastore) -> None:
    paris = timezone(timedelta(hours=1))
    expires = datetime(2030, 1, 1, 13, 0, tzinfo=paris)
    token = store.create_join_token("t", alias_id=None, expires_at=expires)
    agent = store.register_agent(AGENT, attestation_type="x509pop", serial="1", expires_at=expires)
    for value in (token.expires_at, agent.expires_at, store.list_join_tokens()[0].expires_at):
        assert value == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
        assert value.tzinfo == UTC
    assert store.get_agent(AGENT).expires_at.tzinfo == UTC
    with pytest.raises(InvalidArgument):
        store.create_join_token("n", alias_id=None, expires_at=datetime(2030, 1, 1))
    assert [t.token for t in store.list_join_tokens()] == ["t"]


# -- availability -----------------------------------------------------------------


def test_ping_and_close(datastore_url: str) -> None:
    store = open_datastore(datastore_url)
    store.ping()
    store.close()
    with pytest.raises(Unavailable) as caught:
        store.ping()
    assert caught.value.message == "the datastore is closed; the server is shutting down"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_database_is_unavailable() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/tessera"
    with pytest.raises(Unavailable) as caught:
        open_datastore(url)
    message = caught.value.message
    assert message.startswith("the datastore is unavailable: connection failed: ")
    assert message.endswith(UNAVAILABLE_END)
    assert caught.value.status == 503
    assert isinstance(caught.value.__cause__, sa_exc.OperationalError)


def test_a_database_that_goes_away_is_unavailable(postgres_url: str) -> None:
    store = open_datastore(postgres_url)
    store.ping()
    admin = sa.create_engine(postgres_url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            name = postgres_url.rsplit("/", 1)[1]
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
    for call in (store.ping, store.current_revision, lambda: store.create_entry(new_entry())):
        with pytest.raises(Unavailable) as caught:
            call()
        assert caught.value.message.startswith("the datastore is unavailable: ")
        assert caught.value.message.endswith(UNAVAILABLE_END)
        assert isinstance(caught.value.__cause__, sa_exc.SQLAlchemyError)
    store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "mysql://db/tessera",
            "the datastore URL scheme 'mysql' is not supported; "
            "use sqlite:///<absolute path> or postgresql+psycopg://...",
        ),
        (
            "sqlite:///relative.sqlite3",
            "the SQLite datastore URL must name an absolute file path, e.g. "
            "sqlite:////var/lib/tessera/datastore.sqlite3; got 'sqlite:///relative.sqlite3'",
        ),
        (
            "sqlite://",
            "the SQLite datastore URL must name an absolute file path, e.g. "
            "sqlite:////var/lib/tessera/datastore.sqlite3; got 'sqlite://'",
        ),
        (
            "postgresql+psycopg2://db/tessera",
            "the PostgreSQL driver 'postgresql+psycopg2' is not supported; "
            "use a postgresql+psycopg:// URL",
        ),
        (
            "not a url",
            "the datastore URL 'not a url' is not a database URL; use e.g. "
            "sqlite:////var/lib/tessera/datastore.sqlite3 or postgresql+psycopg://user@host/dbname",
        ),
    ],
)
def test_bad_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_datastore(url)
    assert caught.value.message == message


# -- SQLite specifics -------------------------------------------------------------


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    url = default_datastore_url(tmp_path / "data")
    assert url == f"sqlite:///{tmp_path}/data/datastore.sqlite3"
    open_datastore(url).close()
    path = tmp_path / "data" / "datastore.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()

    os.chmod(path, 0o644)  # a file others can read is tightened on open
    open_datastore(url).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_sqlite_enforces_foreign_keys(sqlite_url: str) -> None:
    store = open_datastore(sqlite_url)
    store.register_agent(
        AGENT, attestation_type="x", serial="1", expires_at=START, selectors=[sel("a:b")]
    )
    store.add_agent_alias(AGENT, f"{TD}/alias")
    store.delete_agent(AGENT)  # selectors and aliases cascade only with foreign keys on
    store.close()
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
        assert conn.execute("SELECT count(*) FROM agent_selectors").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM agent_aliases").fetchone() == (0,)
    conn.close()


def test_sqlite_path_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as caught:
        open_datastore(f"sqlite:///{blocker}/sub/datastore.sqlite3")
    assert caught.value.message == (
        f"cannot create the datastore file {blocker}/sub/datastore.sqlite3: Not a directory; "
        "choose a data directory the server may write to"
    )


def test_entry_records_are_frozen(store: Datastore) -> None:
    entry: RegistrationEntry = store.create_entry(new_entry())
    with pytest.raises(AttributeError):
        entry.hint = "changed"  # type: ignore[misc]


# -- the console's reads: entry search, valid SVIDs ----------------------------------------


def test_entry_search_matches_part_of_the_spiffe_id_parent_and_selectors_a_page_at_a_time(
    store: Datastore,
) -> None:
    made = [store.create_entry(new_entry(f"svc-{n:02}", selectors=(f"unix:uid:{n}",)))
            for n in range(12)]
    store.create_entry(new_entry("100%_off", parent=f"{TD}/node/other",
                                 selectors=("unix:uid:1", "k8s:ns:shop")))
    found, total = store.search_entries(text="SVC-", limit=5, offset=5)  # any case
    assert total == 12
    assert [e.spiffe_id for e in found] == [f"{TD}/svc-{n:02}" for n in range(5, 10)]
    # % and _ are themselves, not patterns; an entry's ID finds it too.
    assert [e.spiffe_id for e in store.search_entries(text="0%_")[0]] == [f"{TD}/100%_off"]
    assert store.search_entries(text="%")[1] == 1
    assert [e.id for e in store.search_entries(text=made[3].id)[0]] == [made[3].id]
    by_parent, count = store.search_entries(parent_id=f"{TD}/node/other")
    assert count == 1 and by_parent[0].spiffe_id == f"{TD}/100%_off"
    both, count = store.search_entries(selectors=[sel("unix:uid:1"), sel("k8s:ns:shop")])
    assert count == 1 and {s.type for s in both[0].selectors} == {"k8s", "unix"}
    assert store.search_entries(text="nothing-like-it") == ([], 0)
    store.delete_entry(made[0].id)
    assert store.search_entries(text="svc-")[1] == 11
    with pytest.raises(InvalidArgument):
        store.search_entries(offset=-1)


def test_valid_issued_svids_soonest_first_or_newest_first(store: Datastore) -> None:
    store.record_issued_svids([
        svid("a", expires_at=START + timedelta(minutes=30)),
        svid("b", expires_at=START + timedelta(hours=3), spiffe_id=f"{TD}/db"),
        svid("c", expires_at=START + timedelta(minutes=10), agent_id=f"{TD}/agent/two"),
        svid("gone", expires_at=START - timedelta(minutes=1)),
    ])
    soon, total = store.list_issued_svids(valid_at=START,
                                          expiring_before=START + timedelta(hours=1))
    assert [s.serial for s in soon] == ["c", "a"] and total == 2
    newest, total = store.list_issued_svids(valid_at=START, limit=2)
    assert [s.serial for s in newest] == ["b", "a"] and total == 3
    mine, _ = store.list_issued_svids(valid_at=START, spiffe_id=f"{TD}/web")
    assert [s.serial for s in mine] == ["a", "c"]
    theirs, _ = store.list_issued_svids(valid_at=START, agent_id=f"{TD}/agent/two")
    assert [(s.serial, s.kind, s.authority_id) for s in theirs] == [("c", "x509", "ab12")]
    assert theirs[0].expires_at == START + timedelta(minutes=10)
