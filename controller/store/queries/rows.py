"""Row helpers the other store modules share: the report's JSON form and the workspace row."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.orm import Session

from controller.domain.models import (
    Plugin,
)
from controller.store.tables import (
    WorkspaceRow,
)


def report_to_json(plugins: Iterable[Plugin]) -> list[dict[str, str | bool]]:
    return [plugin.to_json() for plugin in sorted(plugins, key=lambda p: p.name)]


def report_from_json(data: list[dict[str, str | bool]] | None) -> dict[str, Plugin] | None:
    if data is None:
        return None
    return {str(item["name"]): Plugin.from_json(item) for item in data}


def ensure_workspace(session: Session, workspace_id: str) -> WorkspaceRow:
    row = session.get(WorkspaceRow, workspace_id)
    if row is None:
        row = WorkspaceRow(workspace_id=workspace_id, dormant=False, restart_pending=False)
        session.add(row)
    return row
