"""The mesh's catalog: the instances agents registered, with their health and lease.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# Frozen copy of the types at this revision: later model changes must not change it.
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mesh_instances",
        sa.Column("node", sa.Text(), nullable=False),
        sa.Column("service", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("spiffe_id", sa.Text(), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("health", sa.Text(), nullable=False),
        sa.Column("since", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("node", "service", "address", name=op.f("pk_mesh_instances")),
    )
    op.create_index(
        op.f("ix_mesh_instances_revision"), "mesh_instances", ["revision"], unique=False
    )
    op.create_index(
        op.f("ix_mesh_instances_expires_at"), "mesh_instances", ["expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_mesh_instances_expires_at"), table_name="mesh_instances")
    op.drop_index(op.f("ix_mesh_instances_revision"), table_name="mesh_instances")
    op.drop_table("mesh_instances")
