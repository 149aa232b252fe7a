"""Hash-chain the audit log: prev_hash and hash on every event, and a head row.

Events written before this revision are chained in id order as it runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ca.datastore.audit import GENESIS, event_digest

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

HEAD = "head"


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("prev_hash", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("hash", sa.Text(), nullable=False, server_default=""))
    head = op.create_table(
        "audit_head",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_audit_head")),
    )
    connection = op.get_bind()
    events = sa.table(
        "audit_events",
        sa.column("id", sa.BigInteger()),
        sa.column("at", sa.DateTime(timezone=True)),
        sa.column("actor", sa.Text()),
        sa.column("action", sa.Text()),
        sa.column("target", sa.Text()),
        sa.column("details", sa.JSON()),
        sa.column("prev_hash", sa.Text()),
        sa.column("hash", sa.Text()),
    )
    from ca.datastore.schema import UtcDateTime

    as_utc = UtcDateTime().process_result_value
    previous, last_id = GENESIS, 0
    rows = connection.execute(sa.select(events).order_by(events.c.id)).mappings().all()
    for row in rows:
        at = as_utc(row["at"], connection.dialect)
        assert at is not None
        digest = event_digest(
            previous, row["id"], at, row["actor"], row["action"], row["target"], row["details"]
        )
        connection.execute(
            events.update().where(events.c.id == row["id"]).values(prev_hash=previous, hash=digest)
        )
        previous, last_id = digest, row["id"]
    op.bulk_insert(head, [{"name": HEAD, "last_id": last_id, "last_hash": previous}])


def downgrade() -> None:
    op.drop_table("audit_head")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
