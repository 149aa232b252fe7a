"""Remember an agent's serial from before its last renewal.

The previous SVID stays acceptable until the renewed one is first used, so an
agent whose renewal answer was lost in transit is not locked out.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attested_agents") as batch:
        batch.add_column(
            sa.Column("previous_serial", sa.Text(), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("attested_agents") as batch:
        batch.drop_column("previous_serial")
