"""The initial schema: entries, agents, join tokens, the CA journal, bundles,
issued SVIDs and the audit log.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copy of the types at this revision: later model changes must not change it.
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_counters")),
    )
    op.bulk_insert(
        counters,
        [
            {"name": "entry_revision", "value": 0},
            {"name": "bundle_sequence", "value": 0},
            {"name": "tombstone_horizon", "value": 0},
        ],
    )

    op.create_table(
        "registration_entries",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("spiffe_id", sa.Text(), nullable=False),
        sa.Column("parent_id", sa.Text(), nullable=False),
        sa.Column("live_key", sa.Text(), nullable=True),
        sa.Column("x509_svid_ttl", sa.Integer(), nullable=False),
        sa.Column("jwt_svid_ttl", sa.Integer(), nullable=False),
        sa.Column("dns_names", sa.JSON(), nullable=False),
        sa.Column("federates_with", sa.JSON(), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("downstream", sa.Boolean(), nullable=False),
        sa.Column("node", sa.Boolean(), nullable=False),
        sa.Column("hint", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registration_entries")),
        sa.UniqueConstraint("live_key", name=op.f("uq_registration_entries_live_key")),
    )
    op.create_index(
        op.f("ix_registration_entries_spiffe_id"), "registration_entries", ["spiffe_id"]
    )
    op.create_index(
        op.f("ix_registration_entries_parent_id"), "registration_entries", ["parent_id"]
    )
    op.create_index(
        op.f("ix_registration_entries_revision"), "registration_entries", ["revision"]
    )

    op.create_table(
        "entry_selectors",
        sa.Column("entry_id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["registration_entries.id"],
            name=op.f("fk_entry_selectors_entry_id_registration_entries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("entry_id", "type", "value", name=op.f("pk_entry_selectors")),
    )
    op.create_index("ix_entry_selectors_type_value", "entry_selectors", ["type", "value"])

    op.create_table(
        "attested_agents",
        sa.Column("spiffe_id", sa.Text(), nullable=False),
        sa.Column("attestation_type", sa.Text(), nullable=False),
        sa.Column("serial", sa.Text(), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("banned", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("spiffe_id", name=op.f("pk_attested_agents")),
    )
    op.create_table(
        "agent_selectors",
        sa.Column("agent_id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["attested_agents.spiffe_id"],
            name=op.f("fk_agent_selectors_agent_id_attested_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", "type", "value", name=op.f("pk_agent_selectors")),
    )
    op.create_table(
        "agent_aliases",
        sa.Column("agent_id", sa.Text(), nullable=False),
        sa.Column("alias_id", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["attested_agents.spiffe_id"],
            name=op.f("fk_agent_aliases_agent_id_attested_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", "alias_id", name=op.f("pk_agent_aliases")),
    )
    op.create_index(op.f("ix_agent_aliases_alias_id"), "agent_aliases", ["alias_id"])

    op.create_table(
        "join_tokens",
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("alias_id", sa.Text(), nullable=True),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_join_tokens")),
    )
    op.create_index(op.f("ix_join_tokens_expires_at"), "join_tokens", ["expires_at"])

    op.create_table(
        "authorities",
        sa.Column("authority_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("server_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("tainted", sa.Boolean(), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("key_type", sa.Text(), nullable=False),
        sa.Column("not_before", TS, nullable=False),
        sa.Column("not_after", TS, nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=True),
        sa.Column("chain", sa.LargeBinary(), nullable=False),
        sa.Column("upstream_roots", sa.LargeBinary(), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("authority_id", name=op.f("pk_authorities")),
    )
    op.create_index(op.f("ix_authorities_server_id"), "authorities", ["server_id"])

    op.create_table(
        "federated_bundles",
        sa.Column("trust_domain", sa.Text(), nullable=False),
        sa.Column("bundle", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("trust_domain", name=op.f("pk_federated_bundles")),
    )

    op.create_table(
        "issued_svids",
        sa.Column("serial", sa.Text(), nullable=False),
        sa.Column("spiffe_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("agent_id", sa.Text(), nullable=True),
        sa.Column("authority_id", sa.Text(), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_issued_svids")),
    )
    op.create_index(op.f("ix_issued_svids_expires_at"), "issued_svids", ["expires_at"])

    op.create_table(
        "audit_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )


def downgrade() -> None:
    for table in (
        "audit_events",
        "issued_svids",
        "federated_bundles",
        "authorities",
        "join_tokens",
        "agent_aliases",
        "agent_selectors",
        "attested_agents",
        "entry_selectors",
        "registration_entries",
        "counters",
    ):
        op.drop_table(table)
