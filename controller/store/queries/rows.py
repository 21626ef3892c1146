"""Row helpers the other store modules share: the report's JSON form and the workspace row."""

from __future__ import annotations

import functools
import json
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


def report_from_text(text: str | None) -> dict[str, Plugin] | None:
    """`report_from_json` of the column's JSON text (SQL NULL or JSON null: no report).
    Runtimes of one template report the same plugins, so the same text: parsed once
    (`_parsed_report`), each caller gets a dict of its own over the shared, frozen Plugins."""
    parsed = None if text is None else _parsed_report(text)
    return None if parsed is None else dict(parsed)


@functools.lru_cache(maxsize=4096)
def _parsed_report(text: str) -> tuple[tuple[str, Plugin], ...] | None:
    report = report_from_json(json.loads(text))
    return None if report is None else tuple(report.items())


def ensure_workspace(session: Session, workspace_id: str) -> WorkspaceRow:
    row = session.get(WorkspaceRow, workspace_id)
    if row is None:
        row = WorkspaceRow(workspace_id=workspace_id, dormant=False, restart_pending=False)
        session.add(row)
    return row
