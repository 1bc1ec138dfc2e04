"""inbound policy: rules, contacts, webhook receipts, message decisions and folders

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "workspaces",
        sa.Column("contacts_bypass", sa.Boolean(), server_default=sa.text("true"), nullable=False),
    )
    op.add_column(
        "workspaces",
        sa.Column("policy_version", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "agents",
        sa.Column("policy_version", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("messages", sa.Column("visible_at", sa.DateTime(), nullable=True))
    op.add_column("messages", sa.Column("previous_folder", sa.String(length=20), nullable=True))
    op.add_column("messages", sa.Column("folder_changed_at", sa.DateTime(), nullable=True))
    op.add_column("messages", sa.Column("decision", sa.JSON(), nullable=True))
    op.add_column("messages", sa.Column("auth_results", sa.JSON(), nullable=True))
    # Everything stored before rules existed was delivered to its agent.
    op.execute("UPDATE messages SET visible_at = received_at WHERE folder = 'inbox'")
    op.create_index(
        op.f("ix_messages_workspace_id_folder_seq"),
        "messages",
        ["workspace_id", "folder", "seq"],
        unique=False,
    )
    op.create_index(
        op.f("ix_messages_folder_folder_changed_at"),
        "messages",
        ["folder", "folder_changed_at"],
        unique=False,
    )

    op.create_table(
        "rules",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("direction", sa.String(length=10), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("condition", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_rules_agent_id_agents"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_rules_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules")),
    )
    op.create_index(
        op.f("ix_rules_workspace_id_agent_id_position"),
        "rules",
        ["workspace_id", "agent_id", "position"],
        unique=False,
    )

    op.create_table(
        "contacts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=True),
        sa.Column("scope", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("value", sa.String(length=320), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("auto_approve", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_contacts_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_contacts_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contacts")),
        sa.UniqueConstraint(
            "workspace_id", "scope", "value", name=op.f("uq_contacts_workspace_id_scope_value")
        ),
    )

    op.create_table(
        "webhook_receipts",
        sa.Column("provider", sa.String(length=20), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("body_sha256", sa.String(length=64), nullable=False),
        sa.Column("results", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "event_id", name=op.f("pk_webhook_receipts")),
    )
    op.create_index(
        op.f("ix_webhook_receipts_expires_at"), "webhook_receipts", ["expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_webhook_receipts_expires_at"), table_name="webhook_receipts")
    op.drop_table("webhook_receipts")
    op.drop_table("contacts")
    op.drop_index(op.f("ix_rules_workspace_id_agent_id_position"), table_name="rules")
    op.drop_table("rules")
    op.drop_index(op.f("ix_messages_folder_folder_changed_at"), table_name="messages")
    op.drop_index(op.f("ix_messages_workspace_id_folder_seq"), table_name="messages")
    with op.batch_alter_table("messages") as batch_op:
        for column in ("auth_results", "decision", "folder_changed_at", "previous_folder"):
            batch_op.drop_column(column)
        batch_op.drop_column("visible_at")
    with op.batch_alter_table("agents") as batch_op:
        batch_op.drop_column("policy_version")
    with op.batch_alter_table("workspaces") as batch_op:
        batch_op.drop_column("policy_version")
        batch_op.drop_column("contacts_bypass")
