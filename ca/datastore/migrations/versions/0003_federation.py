"""Federation relationships: which trust domains this one federates with, where
their bundle endpoints are and how the last refresh of each went.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Frozen copy of the types at this revision: later model changes must not change it.
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "federation_relationships",
        sa.Column("trust_domain", sa.Text(), nullable=False),
        sa.Column("bundle_endpoint_url", sa.Text(), nullable=False),
        sa.Column("profile", sa.Text(), nullable=False),
        sa.Column("endpoint_spiffe_id", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("last_refresh_at", TS, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("trust_domain", name=op.f("pk_federation_relationships")),
    )


def downgrade() -> None:
    op.drop_table("federation_relationships")
