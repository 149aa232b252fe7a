"""The mesh configuration: its resources (with tombstones), its revision counter and
the horizon below which tombstones are purged.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Frozen copy of the types at this revision: later model changes must not change it.
TS = sa.DateTime(timezone=True)
COUNTERS = sa.table("counters", sa.column("name", sa.Text()), sa.column("value", sa.BigInteger()))
MESH_COUNTERS = ("mesh_revision", "mesh_tombstone_horizon")


def upgrade() -> None:
    op.create_table(
        "mesh_resources",
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "name", name=op.f("pk_mesh_resources")),
    )
    op.create_index(
        op.f("ix_mesh_resources_revision"), "mesh_resources", ["revision"], unique=False
    )
    op.bulk_insert(COUNTERS, [{"name": name, "value": 0} for name in MESH_COUNTERS])


def downgrade() -> None:
    op.execute(COUNTERS.delete().where(COUNTERS.c.name.in_(MESH_COUNTERS)))
    op.drop_index(op.f("ix_mesh_resources_revision"), table_name="mesh_resources")
    op.drop_table("mesh_resources")
