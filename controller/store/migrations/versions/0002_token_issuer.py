"""tokens.issuer: who made a token ("cli" or "operator"), so the operator revokes only its own

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("issuer", sa.String(32), nullable=False,
                                   server_default="cli"))


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("issuer")
