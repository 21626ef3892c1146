"""workspaces.claimed_by / claimed_until: which replica acts on a workspace, until when;
an index on tokens.revoked_at for the registries' revocation read-back

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workspaces") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(253), nullable=True))
        batch.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_tokens_revoked_at", "tokens", ["revoked_at"])


def downgrade() -> None:
    op.drop_index("ix_tokens_revoked_at", table_name="tokens")
    with op.batch_alter_table("workspaces") as batch:
        batch.drop_column("claimed_until")
        batch.drop_column("claimed_by")
