"""The agents counter: bumped by every change to an attested agent, so a server
caching agent records hears of the changes other servers make.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COUNTERS = sa.table("counters", sa.column("name", sa.Text()), sa.column("value", sa.BigInteger()))


def upgrade() -> None:
    op.bulk_insert(COUNTERS, [{"name": "agents", "value": 0}])


def downgrade() -> None:
    op.execute(COUNTERS.delete().where(COUNTERS.c.name == "agents"))
