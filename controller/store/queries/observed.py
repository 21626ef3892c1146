"""The loop's reads: everything known about many workspaces in a constant number of queries,
and the in-sync markers that let a pass skip what has not changed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Text,
    and_,
    bindparam,
    case,
    cast,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session

from controller.domain.models import (
    Attempt,
    Observed,
    Plugin,
)
from controller.store.queries.rows import report_from_text
from controller.store.tables import (
    AttemptRow,
    Base,
    OwnedPluginRow,
    RestartRow,
    WorkspaceRow,
)


def _selection(
    now: datetime, offline_after: timedelta | None, only: Collection[str] | None
) -> ColumnElement[bool]:
    conditions: list[ColumnElement[bool]] = []
    if offline_after is not None:
        conditions += [
            WorkspaceRow.url.is_not(None),
            WorkspaceRow.dormant.is_(False),
            WorkspaceRow.last_seen_at >= now - offline_after,
        ]
    if only is not None:
        conditions.append(WorkspaceRow.workspace_id.in_(list(only)))
    return and_(true(), *conditions)


def online_digests(
    session: Session,
    *,
    now: datetime,
    offline_after: timedelta,
    only: Collection[str] | None = None,
) -> dict[str, tuple[str | None, str | None]]:
    """(report digest, synced digest) of every online workspace: one light query, enough to
    recognise the converged ones without loading anything else."""
    # Core, not the ORM: this reads one row per online workspace on every pass.
    rows = session.connection().execute(
        select(WorkspaceRow.workspace_id, WorkspaceRow.report_digest,
               # A pending restart is work to do whatever the digests say.
               case((WorkspaceRow.restart_pending, None), else_=WorkspaceRow.synced_digest))
        .where(_selection(now, offline_after, only)))
    return {workspace_id: (report_digest, marker)
            for workspace_id, report_digest, marker in rows}


def mark_synced(session: Session, markers: dict[str, str]) -> None:
    """Remember that these workspaces were found in sync (one statement for all of them)."""
    if not markers:
        return
    table = Base.metadata.tables[WorkspaceRow.__tablename__]
    session.execute(
        update(table).where(table.c.workspace_id == bindparam("b_id"))
        .values(synced_digest=bindparam("b_digest")),
        [{"b_id": workspace_id, "b_digest": digest} for workspace_id, digest in markers.items()],
    )


def load_observed(
    session: Session,
    *,
    now: datetime,
    offline_after: timedelta | None = None,
    restart_window: timedelta = timedelta(hours=1),
    only: Collection[str] | None = None,
) -> dict[str, Observed]:
    """Observed state of every workspace, or of the online ones when `offline_after` is given,
    or of `only` these ids; restarts within `restart_window` before `now` (the budget's
    window: older rows are pruned anyway). Four queries, however many workspaces there are."""
    selected = _selection(now, offline_after, only)
    # Core on the session's connection, not the ORM's execute: plain rows, none of the ORM's
    # loading machinery per row (this reads every workspace for every full pass and mirror).
    session.flush()  # (which the ORM's execute would do): what this transaction added counts
    connection = session.connection()
    rows = connection.execute(select(
        WorkspaceRow.workspace_id, WorkspaceRow.url, WorkspaceRow.registered_at,
        WorkspaceRow.last_seen_at, WorkspaceRow.dormant,
        cast(WorkspaceRow.report, Text).label("report_text"),
        WorkspaceRow.report_at, WorkspaceRow.restart_pending, WorkspaceRow.runtime_error,
    ).where(selected)).all()

    owned: dict[str, dict[str, Plugin]] = defaultdict(dict)
    plugins: dict[tuple[str, str, str | None], Plugin] = {}  # one frozen Plugin per kind
    for workspace_id, name, source, digest in connection.execute(
        select(OwnedPluginRow.workspace_id, OwnedPluginRow.name, OwnedPluginRow.source,
               OwnedPluginRow.digest)
        .join(WorkspaceRow, WorkspaceRow.workspace_id == OwnedPluginRow.workspace_id)
        .where(selected)
    ):
        plugin = plugins.get(key := (name, source, digest))
        if plugin is None:
            plugin = plugins[key] = Plugin(name, source, digest)
        owned[workspace_id][name] = plugin

    attempts: dict[str, dict[str, Attempt]] = defaultdict(dict)
    for attempt_row in connection.execute(
        select(AttemptRow.workspace_id, AttemptRow.key, AttemptRow.failures,
               AttemptRow.last_error, AttemptRow.last_attempt_at, AttemptRow.next_retry_at)
        .join(WorkspaceRow, WorkspaceRow.workspace_id == AttemptRow.workspace_id)
        .where(selected)
    ):
        attempts[attempt_row.workspace_id][attempt_row.key] = Attempt(
            attempt_row.failures, attempt_row.last_error, attempt_row.last_attempt_at,
            attempt_row.next_retry_at,
        )

    restarts: dict[str, list[datetime]] = defaultdict(list)
    restart_query = (
        select(RestartRow.workspace_id, RestartRow.at)
        .join(WorkspaceRow, WorkspaceRow.workspace_id == RestartRow.workspace_id)
        .where(selected)
        .order_by(RestartRow.at)
    )
    restart_query = restart_query.where(RestartRow.at > now - restart_window)
    for restart_row in connection.execute(restart_query):
        restarts[restart_row.workspace_id].append(restart_row.at)

    return {
        row.workspace_id: Observed(
            workspace_id=row.workspace_id,
            url=row.url,
            registered_at=row.registered_at,
            last_seen_at=row.last_seen_at,
            dormant=row.dormant,
            report=report_from_text(row.report_text),
            report_at=row.report_at,
            owned=owned.get(row.workspace_id, {}),
            attempts=attempts.get(row.workspace_id, {}),
            restarts=tuple(restarts.get(row.workspace_id, ())),
            restart_pending=row.restart_pending,
            runtime_error=row.runtime_error,
        )
        for row in rows
    }
