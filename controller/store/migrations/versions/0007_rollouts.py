"""rollouts: per template, the stable revision, the one rolling out and its progress

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

TIMESTAMP = sa.DateTime(timezone=True)

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("template", sa.String(320), nullable=False),
        sa.Column("stable_digest", sa.String(64), nullable=False),
        sa.Column("stable_plugins", sa.JSON(), nullable=False),
        sa.Column("target_digest", sa.String(64), nullable=True),
        sa.Column("target_plugins", sa.JSON(), nullable=True),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("counted_since", TIMESTAMP, nullable=True),
        sa.Column("healthy_since", TIMESTAMP, nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("template", name=op.f("pk_rollouts")),
    )


def downgrade() -> None:
    op.drop_table("rollouts")
