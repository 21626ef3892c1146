"""The store's schema: the facts the registry records and the loop's outcomes. Typed
SQLAlchemy 2.x models; migrations in `controller/store/migrations` mirror this file."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class WorkspaceRow(Base):
    """One workspace as its runtime told us: where it is, when we last heard, what it has."""

    __tablename__ = "workspaces"

    workspace_id: Mapped[str] = mapped_column(String(253), primary_key=True)
    url: Mapped[str | None] = mapped_column(String(2048))
    registered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    dormant: Mapped[bool] = mapped_column(Boolean, default=False)
    # The runtime's full plugin set as last reported: [{"name", "source", "digest"?}], or NULL
    # when nothing is known since the last register (the loop then asks the runtime).
    report: Mapped[list[dict[str, str | bool]] | None] = mapped_column(JSON)
    report_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    restart_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    # Digest of `report` (NULL with it), and the digest of (desired, report) that the last
    # pass found in sync: while both still match, the workspace needs no planning at all.
    report_digest: Mapped[str | None] = mapped_column(String(64))
    synced_digest: Mapped[str | None] = mapped_column(String(64))
    # The highest `seq` a runtime sent with the stored report (NULL: none); a register
    # resets it, since a restarted runtime may count from zero again.
    report_seq: Mapped[int | None] = mapped_column(BigInteger)
    # What the runtime reported as its own trouble with that report (a failed restart
    # command); NULL: none. Part of the report's digest.
    runtime_error: Mapped[str | None] = mapped_column(Text)
    # The replica acting on this workspace, and until when its claim holds (see claim()).
    claimed_by: Mapped[str | None] = mapped_column(String(253))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class TokenRow(Base):
    """A registry token: only its SHA-256 is kept."""

    __tablename__ = "tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.workspace_id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    issuer: Mapped[str] = mapped_column(String(32), default="cli", server_default="cli")


class OwnedPluginRow(Base):
    """A plugin this controller installed because it was declared: the only kind it removes."""

    __tablename__ = "owned_plugins"

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.workspace_id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    source: Mapped[str] = mapped_column(String(2048))
    digest: Mapped[str | None] = mapped_column(String(256))
    installed_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AttemptRow(Base):
    """Consecutive failures of one (workspace, plugin or '@runtime') and the next retry."""

    __tablename__ = "attempts"

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.workspace_id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text)
    last_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_retry_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RestartRow(Base):
    """One restart the controller asked for, kept for the restart budget."""

    __tablename__ = "restarts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.workspace_id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class RolloutRow(Base):
    """One template's rollout: its stable revision, the one in flight, and how far it got.
    Replicas change a row only at the `version` they read (compare-and-set)."""

    __tablename__ = "rollouts"

    template: Mapped[str] = mapped_column(String(320), primary_key=True)  # "namespace/name"
    stable_digest: Mapped[str] = mapped_column(String(64))
    stable_plugins: Mapped[list[dict[str, str | bool]]] = mapped_column(JSON)
    target_digest: Mapped[str | None] = mapped_column(String(64))
    target_plugins: Mapped[list[dict[str, str | bool]] | None] = mapped_column(JSON)
    phase: Mapped[str] = mapped_column(String(16))
    wave: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    counted_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    healthy_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    message: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # the prune found the template gone from desired state since (store/queries/prune.py)
    absent_since: Mapped[datetime | None] = mapped_column(UTCDateTime())


class RolloutWorkspaceRow(Base):
    """A workspace let through to the revision its template's rollout is moving to: it stays
    there, whoever joins or leaves the template, until that rollout ends (then the row goes).
    Rows of another revision than the rollout's target are stale."""

    __tablename__ = "rollout_workspaces"

    template: Mapped[str] = mapped_column(String(320), primary_key=True)  # "namespace/name"
    workspace_id: Mapped[str] = mapped_column(String(253), primary_key=True)
    revision: Mapped[str] = mapped_column(String(64))  # the target's digest
