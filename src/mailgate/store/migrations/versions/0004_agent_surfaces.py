"""agent surfaces: drafts, webhooks, inbox fields on agents

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 12:55:58.894849
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "drafts",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=False),
        sa.Column("client_id", sa.String(length=200), nullable=True),
        sa.Column("to_addrs", sa.JSON(), nullable=False),
        sa.Column("cc_addrs", sa.JSON(), nullable=False),
        sa.Column("bcc_addrs", sa.JSON(), nullable=False),
        sa.Column("reply_to", sa.JSON(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("text_body", sa.Text(), nullable=True),
        sa.Column("html_body", sa.Text(), nullable=True),
        sa.Column("attachments", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("in_reply_to", sa.String(length=40), nullable=True),
        sa.Column("forward_of", sa.String(length=40), nullable=True),
        sa.Column("send_status", sa.String(length=20), nullable=True),
        sa.Column("outbound_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_drafts_agent_id_agents"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_drafts_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_drafts")),
        sa.UniqueConstraint("agent_id", "client_id", name=op.f("uq_drafts_agent_id_client_id")),
        sa.UniqueConstraint("id", name=op.f("uq_drafts_id")),
    )
    with op.batch_alter_table("drafts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_drafts_agent_id_seq"), ["agent_id", "seq"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_drafts_workspace_id_seq"), ["workspace_id", "seq"], unique=False
        )

    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_types", sa.JSON(), nullable=True),
        sa.Column("inbox_ids", sa.JSON(), nullable=True),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("client_id", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_webhooks_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_webhooks_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
        sa.UniqueConstraint(
            "workspace_id", "client_id", name=op.f("uq_webhooks_workspace_id_client_id")
        ),
    )
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhooks_enabled"), ["enabled"], unique=False)

    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("display_name", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("client_id", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("inbox_metadata", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(), nullable=True))
        batch_op.create_unique_constraint(
            batch_op.f("uq_agents_workspace_id_client_id"), ["workspace_id", "client_id"]
        )


def downgrade() -> None:

    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_agents_workspace_id_client_id"), type_="unique")
        batch_op.drop_column("updated_at")
        batch_op.drop_column("inbox_metadata")
        batch_op.drop_column("client_id")
        batch_op.drop_column("display_name")

    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhooks_enabled"))

    op.drop_table("webhooks")
    with op.batch_alter_table("drafts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_drafts_workspace_id_seq"))
        batch_op.drop_index(batch_op.f("ix_drafts_agent_id_seq"))

    op.drop_table("drafts")
