"""For benchmarks only: bulk seeding of a fleet, and the naive per-workspace read the bench
compares the loop's reads against."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    insert,
    select,
)
from sqlalchemy.orm import Session

from controller.domain.models import (
    Plugin,
    plugins_digest,
)
from controller.store.queries.rows import report_from_json, report_to_json
from controller.store.tables import (
    OwnedPluginRow,
    TokenRow,
    WorkspaceRow,
)


def seed_fleet(session: Session, fleet: list[tuple[str, str, list[Plugin], str]],
               now: datetime) -> None:
    """Insert converged workspaces in bulk: (workspace id, url, installed plugins, token hash).
    The plugins count as installed by the controller."""
    session.execute(insert(WorkspaceRow), [
        {"workspace_id": workspace_id, "url": url, "registered_at": now, "last_seen_at": now,
         "dormant": False, "report": report_to_json(plugins), "report_at": now,
         "report_digest": plugins_digest(plugins), "restart_pending": False}
        for workspace_id, url, plugins, _ in fleet])
    owned = [{"workspace_id": workspace_id, "name": p.name, "source": p.source,
              "digest": p.digest, "installed_at": now}
             for workspace_id, _, plugins, _ in fleet for p in plugins]
    if owned:
        session.execute(insert(OwnedPluginRow), owned)
    session.execute(insert(TokenRow), [
        {"token_hash": token_hash, "workspace_id": workspace_id, "created_at": now,
         "issuer": "bench"} for workspace_id, _, _, token_hash in fleet])


def naive_read(session: Session, workspace_id: str
               ) -> tuple[dict[str, Plugin] | None, dict[str, Plugin]]:
    """What an edge-triggered platform does per workspace: read what is installed, read what
    it thinks it installed. Two queries per workspace; used only as the benchmark baseline."""
    report = session.scalar(select(WorkspaceRow.report).where(
        WorkspaceRow.workspace_id == workspace_id))
    owned = {row.name: Plugin(row.name, row.source, row.digest) for row in session.execute(
        select(OwnedPluginRow.name, OwnedPluginRow.source, OwnedPluginRow.digest).where(
            OwnedPluginRow.workspace_id == workspace_id))}
    return report_from_json(report), owned
