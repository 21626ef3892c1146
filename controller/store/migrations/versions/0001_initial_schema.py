"""initial schema: workspaces, tokens, owned plugins, attempts, restarts

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def _workspace_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["workspace_id"],
        ["workspaces.workspace_id"],
        name=op.f(f"fk_{table}_workspace_id_workspaces"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "workspaces",
        sa.Column("workspace_id", sa.String(253), nullable=False),
        sa.Column("url", sa.String(2048), nullable=True),
        sa.Column("registered_at", TIMESTAMP, nullable=True),
        sa.Column("last_seen_at", TIMESTAMP, nullable=True),
        sa.Column("dormant", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("report", sa.JSON(), nullable=True),
        sa.Column("report_at", TIMESTAMP, nullable=True),
        sa.Column("restart_pending", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("workspace_id", name=op.f("pk_workspaces")),
    )
    op.create_index(op.f("ix_workspaces_last_seen_at"), "workspaces", ["last_seen_at"])
    op.create_table(
        "tokens",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("workspace_id", sa.String(253), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("revoked_at", TIMESTAMP, nullable=True),
        _workspace_fk("tokens"),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_tokens")),
    )
    op.create_index(op.f("ix_tokens_workspace_id"), "tokens", ["workspace_id"])
    op.create_table(
        "owned_plugins",
        sa.Column("workspace_id", sa.String(253), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("source", sa.String(2048), nullable=False),
        sa.Column("digest", sa.String(256), nullable=True),
        sa.Column("installed_at", TIMESTAMP, nullable=False),
        _workspace_fk("owned_plugins"),
        sa.PrimaryKeyConstraint("workspace_id", "name", name=op.f("pk_owned_plugins")),
    )
    op.create_table(
        "attempts",
        sa.Column("workspace_id", sa.String(253), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("last_attempt_at", TIMESTAMP, nullable=False),
        sa.Column("next_retry_at", TIMESTAMP, nullable=False),
        _workspace_fk("attempts"),
        sa.PrimaryKeyConstraint("workspace_id", "key", name=op.f("pk_attempts")),
    )
    op.create_table(
        "restarts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("workspace_id", sa.String(253), nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        _workspace_fk("restarts"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_restarts")),
    )
    op.create_index(op.f("ix_restarts_workspace_id"), "restarts", ["workspace_id"])


def downgrade() -> None:
    op.drop_table("restarts")
    op.drop_table("attempts")
    op.drop_table("owned_plugins")
    op.drop_table("tokens")
    op.drop_table("workspaces")
