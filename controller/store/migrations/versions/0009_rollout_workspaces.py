"""rollout_workspaces: the workspaces let through to a rollout's target revision, so that
they stay there while the template's fleet grows or shrinks

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollout_workspaces",
        sa.Column("template", sa.String(320), nullable=False),
        sa.Column("workspace_id", sa.String(253), nullable=False),
        sa.Column("revision", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("template", "workspace_id", name=op.f("pk_rollout_workspaces")),
    )


def downgrade() -> None:
    op.drop_table("rollout_workspaces")
