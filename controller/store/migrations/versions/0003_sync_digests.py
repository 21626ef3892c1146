"""workspaces.report_digest and workspaces.synced_digest: a converged workspace is
recognised from one row, without rebuilding its report and ownership

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workspaces") as batch:
        batch.add_column(sa.Column("report_digest", sa.String(64), nullable=True))
        batch.add_column(sa.Column("synced_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workspaces") as batch:
        batch.drop_column("synced_digest")
        batch.drop_column("report_digest")
