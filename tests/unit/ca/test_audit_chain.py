"""The audit log's hash chain, on SQLite and PostgreSQL: tampering is named."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command

from ca.datastore import Datastore
from ca.datastore.migrate import alembic_config
from sdk.clock import ManualClock

START = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(datastore_url: str) -> Iterator[Datastore]:
    with Datastore.open(datastore_url, clock=ManualClock(START)) as opened:
        for number in range(1, 6):
            opened.append_audit(
                actor="admin", action="entry.create", target=f"entry-{number}",
                details={"spiffe_id": f"spiffe://example.org/w{number}"},
            )
        yield opened


def raw(url: str, statement: str, **params: object) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(statement), params)
    finally:
        engine.dispose()


def test_an_untouched_log_verifies(store: Datastore) -> None:
    result = store.verify_audit(batch=2)  # several batches
    assert result.intact
    assert result.checked == 5
    events = store.list_audit()
    assert [e.id for e in events] == [5, 4, 3, 2, 1]
    assert len({e.hash for e in events}) == 5


def test_an_empty_log_verifies(datastore_url: str) -> None:
    with Datastore.open(datastore_url) as empty:
        assert empty.verify_audit().intact
        assert empty.verify_audit().checked == 0


def test_editing_one_row_names_that_row(store: Datastore, datastore_url: str) -> None:
    raw(datastore_url, "UPDATE audit_events SET target = 'entry-x' WHERE id = 3")
    result = store.verify_audit()
    assert result.event_id == 3
    assert result.checked == 2
    assert result.problem is not None
    assert result.problem.startswith("audit event 3 (entry.create on 'entry-x' at ")
    assert result.problem.endswith(
        "was changed after it was written: its content no longer matches its hash")


def test_editing_a_row_and_its_hash_still_names_that_row(
    store: Datastore, datastore_url: str
) -> None:
    raw(datastore_url, "UPDATE audit_events SET actor = 'mallory', hash = 'f00d' WHERE id = 2")
    # Even with a self-consistent forged hash, the next event's link gives it away.
    from ca.datastore.audit import event_digest

    row = next(e for e in store.list_audit() if e.id == 2)
    previous = next(e for e in store.list_audit() if e.id == 1)
    forged = event_digest(previous.hash, 2, row.at, "mallory", row.action, row.target,
                          row.details)
    raw(datastore_url, "UPDATE audit_events SET hash = :h WHERE id = 2", h=forged)
    result = store.verify_audit()
    assert result.event_id == 2
    assert result.problem == (
        "audit event 2 (entry.create on 'entry-2') was rewritten, or the events between it "
        "and event 3 were deleted: event 3 was chained to a different predecessor"
    )


def test_deleting_a_middle_row_is_detected(store: Datastore, datastore_url: str) -> None:
    raw(datastore_url, "DELETE FROM audit_events WHERE id = 3")
    result = store.verify_audit()
    assert result.event_id == 2
    assert result.problem is not None
    assert "the events between it and event 4 were deleted" in result.problem


def test_deleting_the_newest_rows_is_detected(store: Datastore, datastore_url: str) -> None:
    raw(datastore_url, "DELETE FROM audit_events WHERE id >= 4")
    result = store.verify_audit()
    assert result.problem == (
        "the newest audit events were deleted: the log ends at event 3 but its head "
        "names event 5"
    )


def test_appending_after_verification_keeps_the_chain(store: Datastore) -> None:
    store.append_audit(actor="admin", action="entry.delete", target="entry-1")
    assert store.verify_audit().checked == 6


def test_the_upgrade_chains_events_written_before_it(datastore_url: str) -> None:
    engine = sa.create_engine(datastore_url)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "0001")
            for number in range(3):
                connection.execute(
                    sa.text("INSERT INTO audit_events (at, actor, action, target, details) "
                            "VALUES (:at, 'admin', 'token.generate', :t, :d)"),
                    {"at": datetime(2029, 1, 1, 0, 0, number), "t": f"t{number}", "d": "{}"},
                )
    finally:
        engine.dispose()
    with Datastore.open(datastore_url) as upgraded:
        result = upgraded.verify_audit()
        assert result.intact, result.problem
        assert result.checked == 3
        upgraded.append_audit(actor="admin", action="entry.create", target="after")
        assert upgraded.verify_audit().checked == 4
