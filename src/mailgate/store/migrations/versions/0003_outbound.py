"""outbound: requests, recipients, attempts, approvals, idempotency keys,
suppressions, recipient lists, DKIM domains, capture; agents.tier

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sending_domains",
        sa.Column("domain", sa.String(length=255), nullable=False),
        sa.Column("selector", sa.String(length=63), nullable=False),
        sa.Column("private_key_pem", sa.Text(), nullable=False),
        sa.Column("public_key_b64", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("domain", name=op.f("pk_sending_domains")),
    )
    op.create_table(
        "captured",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=True),
        sa.Column("outbound_id", sa.String(length=40), nullable=False),
        sa.Column("mail_from", sa.String(length=320), nullable=False),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("rfc_message_id", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("raw_sha256", sa.String(length=64), nullable=False),
        sa.Column("raw_size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_captured_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_captured")),
        sa.UniqueConstraint("id", name=op.f("uq_captured_id")),
    )
    with op.batch_alter_table("captured", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_captured_agent_id_seq"), ["agent_id", "seq"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_captured_workspace_id_seq"), ["workspace_id", "seq"], unique=False
        )

    op.create_table(
        "suppressions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("reason", sa.String(length=20), nullable=False),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("outbound_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_suppressions_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppressions")),
        sa.UniqueConstraint(
            "workspace_id", "address", name=op.f("uq_suppressions_workspace_id_address")
        ),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("agent_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint", sa.String(length=40), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("locked_until", sa.DateTime(), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.JSON(), nullable=True),
        sa.Column("outbound_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_idempotency_keys_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", "key", name=op.f("pk_idempotency_keys")),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_idempotency_keys_expires_at"), ["expires_at"], unique=False
        )

    op.create_table(
        "outbound",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=True),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("decision", sa.JSON(), nullable=False),
        sa.Column("message_id", sa.String(length=40), nullable=True),
        sa.Column("thread_id", sa.String(length=40), nullable=True),
        sa.Column("replied_message_id", sa.String(length=40), nullable=True),
        sa.Column("rfc_message_id", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("mail_from", sa.String(length=320), nullable=False),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("raw_sha256", sa.String(length=64), nullable=False),
        sa.Column("raw_size", sa.BigInteger(), nullable=False),
        sa.Column("transport", sa.String(length=20), nullable=True),
        sa.Column("provider_message_id", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_outbound_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_outbound_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_outbound")),
        sa.UniqueConstraint("id", name=op.f("uq_outbound_id")),
    )
    with op.batch_alter_table("outbound", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_outbound_agent_id_created_at"), ["agent_id", "created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_outbound_agent_id_seq"), ["agent_id", "seq"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_outbound_provider_message_id"), ["provider_message_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_outbound_rfc_message_id"), ["rfc_message_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_outbound_state_next_attempt_at"),
            ["state", "next_attempt_at"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_outbound_thread_id_created_at"),
            ["thread_id", "created_at"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_outbound_workspace_id_seq"), ["workspace_id", "seq"], unique=False
        )

    op.create_table(
        "recipient_lists",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=True),
        sa.Column("scope", sa.String(length=40), nullable=False),
        sa.Column("list", sa.String(length=5), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("value", sa.String(length=320), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_recipient_lists_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_recipient_lists_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recipient_lists")),
        sa.UniqueConstraint(
            "workspace_id",
            "scope",
            "list",
            "value",
            name=op.f("uq_recipient_lists_workspace_id_scope_list_value"),
        ),
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("outbound_id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("verdict", sa.String(length=20), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["outbound_id"],
            ["outbound.id"],
            name=op.f("fk_approvals_outbound_id_outbound"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_approvals_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
        sa.UniqueConstraint("outbound_id", name=op.f("uq_approvals_outbound_id")),
    )
    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("outbound_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("transport", sa.String(length=20), nullable=False),
        sa.Column("worker", sa.String(length=100), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=True),
        sa.Column("code", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["outbound_id"],
            ["outbound.id"],
            name=op.f("fk_delivery_attempts_outbound_id_outbound"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
        sa.UniqueConstraint(
            "outbound_id", "number", name=op.f("uq_delivery_attempts_outbound_id_number")
        ),
    )
    op.create_table(
        "outbound_recipients",
        sa.Column("outbound_id", sa.String(length=40), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("workspace_id", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=True),
        sa.Column("domain", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=5), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["outbound_id"],
            ["outbound.id"],
            name=op.f("fk_outbound_recipients_outbound_id_outbound"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("outbound_id", "address", name=op.f("pk_outbound_recipients")),
    )
    with op.batch_alter_table("outbound_recipients", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_outbound_recipients_address"), ["address"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_outbound_recipients_agent_id_domain_created_at"),
            ["agent_id", "domain", "created_at"],
            unique=False,
        )

    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "tier", sa.String(length=30), server_default=sa.text("'reply_only'"), nullable=False
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("tier")

    with op.batch_alter_table("outbound_recipients", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbound_recipients_agent_id_domain_created_at"))
        batch_op.drop_index(batch_op.f("ix_outbound_recipients_address"))

    op.drop_table("outbound_recipients")
    op.drop_table("delivery_attempts")
    op.drop_table("approvals")
    op.drop_table("recipient_lists")
    with op.batch_alter_table("outbound", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbound_workspace_id_seq"))
        batch_op.drop_index(batch_op.f("ix_outbound_thread_id_created_at"))
        batch_op.drop_index(batch_op.f("ix_outbound_state_next_attempt_at"))
        batch_op.drop_index(batch_op.f("ix_outbound_rfc_message_id"))
        batch_op.drop_index(batch_op.f("ix_outbound_provider_message_id"))
        batch_op.drop_index(batch_op.f("ix_outbound_agent_id_seq"))
        batch_op.drop_index(batch_op.f("ix_outbound_agent_id_created_at"))

    op.drop_table("outbound")
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idempotency_keys_expires_at"))

    op.drop_table("idempotency_keys")
    op.drop_table("suppressions")
    with op.batch_alter_table("captured", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_captured_workspace_id_seq"))
        batch_op.drop_index(batch_op.f("ix_captured_agent_id_seq"))

    op.drop_table("captured")
    op.drop_table("sending_domains")
