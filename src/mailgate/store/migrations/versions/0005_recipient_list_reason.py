"""recipient list entries keep a reason

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 15:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: existing entries simply have no reason. SQLite adds such a
    # column in place, without rebuilding the table.
    op.add_column("recipient_lists", sa.Column("reason", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recipient_lists") as batch:
        batch.drop_column("reason")
