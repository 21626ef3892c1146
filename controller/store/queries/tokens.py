"""Registry tokens in the store: issued (one or in bulk), looked up by digest, revoked, and
forgotten a while after their revocation."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import datetime, timedelta

from sqlalchemy import (
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from controller.store.tables import (
    TokenRow,
    WorkspaceRow,
)

#: How long a revoked token's row is kept: registries forget revoked tokens from their caches
#: by reading the revocations of the last few seconds (`revoked_since`), so a day leaves
#: plenty for a registry that could not reach the database for a while.
REVOKED_TOKEN_RETENTION = timedelta(days=1)
#: Ids per IN (...) list: SQLite allows 32,766 bound parameters in a statement.
_CHUNK = 1000


def token_workspace(session: Session, token_hash: str) -> str | None:
    """The workspace a (hashed) token belongs to, unless it was revoked."""
    return session.scalar(
        select(TokenRow.workspace_id).where(
            TokenRow.token_hash == token_hash, TokenRow.revoked_at.is_(None)
        )
    )


def add_token(session: Session, workspace_id: str, token_hash: str, *, now: datetime,
              issuer: str = "cli") -> None:
    add_tokens(session, [(workspace_id, token_hash)], now=now, issuer=issuer)


def add_tokens(session: Session, issued: Sequence[tuple[str, str]], *, now: datetime,
               issuer: str = "cli") -> None:
    """Store tokens given as (workspace id, token hash), creating the workspaces not known
    yet: a lookup per thousand ids and two batched INSERTs, however many there are."""
    wanted = list(dict.fromkeys(workspace_id for workspace_id, _ in issued))
    known = set(_existing(session, wanted))
    missing = [{"workspace_id": w, "dormant": False, "restart_pending": False}
               for w in wanted if w not in known]
    if missing:
        session.execute(insert(WorkspaceRow), missing)
    if issued:
        session.execute(insert(TokenRow), [
            {"token_hash": token_hash, "workspace_id": workspace_id, "created_at": now,
             "issuer": issuer} for workspace_id, token_hash in issued])


def _existing(session: Session, workspace_ids: Sequence[str]) -> Iterator[str]:
    for start in range(0, len(workspace_ids), _CHUNK):
        yield from session.scalars(select(WorkspaceRow.workspace_id).where(
            WorkspaceRow.workspace_id.in_(workspace_ids[start:start + _CHUNK])))


def with_live_tokens(session: Session, workspace_ids: Sequence[str]) -> set[str]:
    """Those of these workspaces that hold at least one unrevoked token."""
    found: set[str] = set()
    for start in range(0, len(workspace_ids), _CHUNK):
        found.update(session.scalars(select(TokenRow.workspace_id).distinct().where(
            TokenRow.workspace_id.in_(workspace_ids[start:start + _CHUNK]),
            TokenRow.revoked_at.is_(None))))
    return found


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


def forget_revoked_tokens(session: Session, now: datetime) -> int:
    """Delete the tokens revoked more than REVOKED_TOKEN_RETENTION ago (a revoked token is
    refused whether its row is there or not); returns how many."""
    result = session.execute(
        delete(TokenRow)
        .where(TokenRow.revoked_at.is_not(None),
               TokenRow.revoked_at < now - REVOKED_TOKEN_RETENTION)
        .execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]
