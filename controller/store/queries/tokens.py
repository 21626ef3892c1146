"""Registry tokens in the store: issued, looked up by digest, revoked."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import (
    select,
    update,
)
from sqlalchemy.orm import Session

from controller.store.queries.rows import ensure_workspace
from controller.store.tables import (
    TokenRow,
)


def token_workspace(session: Session, token_hash: str) -> str | None:
    """The workspace a (hashed) token belongs to, unless it was revoked."""
    return session.scalar(
        select(TokenRow.workspace_id).where(
            TokenRow.token_hash == token_hash, TokenRow.revoked_at.is_(None)
        )
    )


def add_token(session: Session, workspace_id: str, token_hash: str, *, now: datetime,
              issuer: str = "cli") -> None:
    ensure_workspace(session, workspace_id)
    session.flush()
    session.add(TokenRow(token_hash=token_hash, workspace_id=workspace_id, created_at=now,
                         issuer=issuer))


def active_tokens(session: Session, issuer: str) -> dict[str, str]:
    """Token hash -> workspace id, for every unrevoked token of one issuer."""
    rows = session.execute(select(TokenRow.token_hash, TokenRow.workspace_id).where(
        TokenRow.issuer == issuer, TokenRow.revoked_at.is_(None)))
    return {row.token_hash: row.workspace_id for row in rows}


def all_active_tokens(session: Session) -> dict[str, str]:
    """Token hash -> workspace id, for every unrevoked token (a registry's warm cache)."""
    rows = session.execute(select(TokenRow.token_hash, TokenRow.workspace_id).where(
        TokenRow.revoked_at.is_(None)))
    return {row.token_hash: row.workspace_id for row in rows}


def revoked_since(session: Session, since: datetime) -> list[str]:
    """Hashes of the tokens revoked at or after `since`."""
    return list(session.scalars(select(TokenRow.token_hash).where(
        TokenRow.revoked_at.is_not(None), TokenRow.revoked_at >= since)))


def tokens_of(session: Session, workspace_id: str
              ) -> list[tuple[str, datetime, datetime | None, str]]:
    """(hash, created, revoked or None, issuer) of every token of a workspace, oldest first."""
    rows = session.execute(
        select(TokenRow.token_hash, TokenRow.created_at, TokenRow.revoked_at, TokenRow.issuer)
        .where(TokenRow.workspace_id == workspace_id).order_by(TokenRow.created_at))
    return [(row.token_hash, row.created_at, row.revoked_at, row.issuer) for row in rows]


def revoke_tokens(session: Session, token_hashes: Collection[str], now: datetime) -> int:
    if not token_hashes:
        return 0
    result = session.execute(
        update(TokenRow)
        .where(TokenRow.token_hash.in_(list(token_hashes)), TokenRow.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]
