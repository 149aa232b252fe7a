"""The datastore's agents counter and agent-change listeners, and entry changes written
with their audit event in one transaction. Runs against SQLite and PostgreSQL alike
(the ``datastore_url`` fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command

from attestor.selector import Selector
from ca.datastore import Datastore, NewEntry
from ca.datastore.migrate import alembic_config
from sdk.clock import ManualClock
from sdk.errors import AlreadyExists, NotFound

START = datetime(2030, 1, 1, tzinfo=UTC)
TD = "spiffe://example.org"
AGENT = f"{TD}/tessera/agent/x509pop/node-1"
OTHER = f"{TD}/tessera/agent/x509pop/node-2"


@pytest.fixture
def store(datastore_url: str) -> Iterator[Datastore]:
    opened = Datastore.open(datastore_url, clock=ManualClock(START))
    yield opened
    opened.close()


def attest(store: Datastore, spiffe_id: str = AGENT, serial: str = "0a") -> None:
    store.register_agent(
        spiffe_id, attestation_type="x509pop", serial=serial,
        expires_at=START + timedelta(hours=1),
    )


def test_every_agent_change_bumps_the_agents_counter_once(store: Datastore) -> None:
    assert store.agent_changes() == 0
    attest(store)
    attest(store, serial="0b")  # attesting again
    store.update_agent_serial(AGENT, "0c", START + timedelta(hours=2))
    store.confirm_agent_serial(AGENT)
    store.set_agent_banned(AGENT, True)
    store.set_agent_banned(AGENT, False)
    store.delete_agent(AGENT)
    assert store.agent_changes() == 7


def test_refused_agent_changes_leave_the_counter_alone(store: Datastore) -> None:
    attest(store)
    for change in (
        lambda: store.update_agent_serial(OTHER, "01", START),
        lambda: store.confirm_agent_serial(OTHER),
        lambda: store.set_agent_banned(OTHER, True),
        lambda: store.delete_agent(OTHER),
    ):
        with pytest.raises(NotFound):
            change()
    assert store.agent_changes() == 1


def test_aliases_entries_and_bundles_are_not_agent_changes(store: Datastore) -> None:
    attest(store)
    store.add_agent_alias(AGENT, f"{TD}/node/a")
    store.create_entry(NewEntry(f"{TD}/web", AGENT, selectors=(Selector.parse("unix:uid:1"),)))
    store.bump_bundle_sequence()
    assert store.sync_counters() == (2, 1, 1, 0)  # revision, bundle, agents, mesh


def test_listeners_hear_each_change_after_its_transaction(store: Datastore) -> None:
    heard: list[tuple[str, int | None, int]] = []

    def listener(spiffe_id: str, counter: int | None) -> None:
        # By the time a listener runs, the change is visible to every reader.
        banned = store.get_agent(spiffe_id).banned if counter is not None else None
        heard.append((spiffe_id, counter, int(bool(banned))))

    store.on_agent_change(listener)
    attest(store)
    store.set_agent_banned(AGENT, True)
    with pytest.raises(NotFound):
        store.set_agent_banned(OTHER, True)

    assert heard == [(AGENT, 1, 0), (AGENT, 2, 1), (OTHER, None, 0)]


def test_an_upgrade_from_0004_adds_the_agents_counter(datastore_url: str) -> None:
    engine = sa.create_engine(datastore_url)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "0004")
            connection.execute(sa.text(
                "UPDATE counters SET value = 41 WHERE name = 'entry_revision'"))
    finally:
        engine.dispose()
    with Datastore.open(datastore_url, clock=ManualClock(START)) as upgraded:
        assert upgraded.sync_counters() == (41, 0, 0, 0)
        attest(upgraded)
        assert upgraded.sync_counters() == (41, 0, 1, 0)


# -- entry changes and their audit events, in one transaction -----------------------------


def web(parent: str = AGENT) -> NewEntry:
    return NewEntry(f"{TD}/web", parent, selectors=(Selector.parse("unix:uid:1"),))


def test_entry_changes_are_audited_in_their_own_transaction(store: Datastore) -> None:
    created = store.create_entry(web(), audited_by="admin")
    updated = store.update_entry(created.id, web(f"{TD}/node/b"), audited_by="admin")
    store.delete_entry(updated.id, audited_by="operator")

    events = store.list_audit()
    assert [(e.actor, e.action, e.target, e.details) for e in reversed(events)] == [
        ("admin", "entry.create", created.id, {"spiffe_id": f"{TD}/web"}),
        ("admin", "entry.update", created.id, {"spiffe_id": f"{TD}/web"}),
        ("operator", "entry.delete", created.id, {"spiffe_id": f"{TD}/web"}),
    ]
    assert events[-1].at == START
    verified = store.verify_audit()
    assert (verified.intact, verified.checked) == (True, 3)
    store.append_audit(actor="admin", action="token.generate", target="")
    assert store.verify_audit().checked == 4


def test_a_refused_entry_change_leaves_no_audit_event(store: Datastore) -> None:
    store.create_entry(web(), audited_by="admin")
    with pytest.raises(AlreadyExists):
        store.create_entry(web(), audited_by="admin")
    with pytest.raises(NotFound):
        store.delete_entry("no-such-entry", audited_by="admin")

    assert [e.action for e in store.list_audit()] == ["entry.create"]
    assert store.current_revision() == 1
