"""Shared roots: the trust domain's self-signed root CAs, their keys encrypted, for the
``shared_root`` upstream authority (every server's authority signed by one root).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Frozen copy of the types at this revision: later model changes must not change it.
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "shared_roots",
        sa.Column("generation", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=False),
        sa.Column("encrypted_key", sa.LargeBinary(), nullable=False),
        sa.Column("not_before", TS, nullable=False),
        sa.Column("not_after", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("generation", name=op.f("pk_shared_roots")),
    )


def downgrade() -> None:
    op.drop_table("shared_roots")
