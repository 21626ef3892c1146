"""Store operations. Each takes the session first, may flush, never commits (the caller owns
the transaction) and returns plain domain values, never ORM objects."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    String,
    Table,
    and_,
    bindparam,
    case,
    cast,
    delete,
    false,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session

from controller.domain.models import (
    Attempt,
    Observed,
    Plugin,
    plugins_by_name,
    plugins_digest,
    report_digest,
)
from controller.domain.outcomes import Changes
from controller.store.tables import (
    AttemptRow,
    Base,
    OwnedPluginRow,
    RestartRow,
    TokenRow,
    WorkspaceRow,
)


def _report_json(plugins: Iterable[Plugin]) -> list[dict[str, str | bool]]:
    return [plugin.to_json() for plugin in sorted(plugins, key=lambda p: p.name)]


def _report(data: list[dict[str, str | bool]] | None) -> dict[str, Plugin] | None:
    if data is None:
        return None
    return {str(item["name"]): Plugin.from_json(item) for item in data}


# --- registry: facts reported by runtimes --------------------------------------------------


def token_workspace(session: Session, token_hash: str) -> str | None:
    """The workspace a (hashed) token belongs to, unless it was revoked."""
    return session.scalar(
        select(TokenRow.workspace_id).where(
            TokenRow.token_hash == token_hash, TokenRow.revoked_at.is_(None)
        )
    )


def _ensure_workspace(session: Session, workspace_id: str) -> WorkspaceRow:
    row = session.get(WorkspaceRow, workspace_id)
    if row is None:
        row = WorkspaceRow(workspace_id=workspace_id, dormant=False, restart_pending=False)
        session.add(row)
    return row


def add_token(session: Session, workspace_id: str, token_hash: str, now: datetime,
              issuer: str = "cli") -> None:
    _ensure_workspace(session, workspace_id)
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


def record_register(
    session: Session, workspace_id: str, url: str, report: list[Plugin] | None, now: datetime,
    seq: int | None = None, error: str | None = None,
) -> None:
    """A runtime (re)started: where it is, and what it has if it said so. Without a report the
    old one is dropped, because a restarted box may have lost what it had. The report's seq
    starts again from the register's."""
    record_registers(session, [(workspace_id, url, report, seq, error)], now)


Register = tuple[str, str, list[Plugin] | None, int | None, str | None]


def record_registers(session: Session, registers: list[Register], now: datetime) -> None:
    """record_register for many at once: one query, one batched INSERT for workspaces not
    known yet, one batched UPDATE (a later register of the same workspace wins)."""
    if not registers:
        return
    table = Base.metadata.tables[WorkspaceRow.__tablename__]
    latest = {workspace_id: (url, report, seq, error)
              for workspace_id, url, report, seq, error in registers}
    known = set(session.connection().execute(
        select(table.c.workspace_id).where(table.c.workspace_id.in_(list(latest)))).scalars())
    missing = [{"workspace_id": w, "dormant": False, "restart_pending": False}
               for w in latest if w not in known]
    if missing:
        session.execute(insert(table), missing)
    session.execute(
        update(table).where(table.c.workspace_id == bindparam("b_id")).values(
            url=bindparam("b_url"), registered_at=bindparam("b_now"),
            last_seen_at=bindparam("b_now"), report=bindparam("b_report"),
            report_digest=bindparam("b_digest"), report_at=bindparam("b_report_at"),
            report_seq=bindparam("b_seq"), runtime_error=bindparam("b_error")),
        [{"b_id": workspace_id, "b_url": url, "b_now": now, "b_seq": seq,
          "b_report": None if report is None else _report_json(report),
          "b_digest": None if report is None else report_digest(report, error),
          "b_report_at": None if report is None else now,
          "b_error": None if report is None else error}
         for workspace_id, (url, report, seq, error) in latest.items()])


def record_changed_report(
    session: Session, workspace_id: str, report: list[Plugin], now: datetime,
    seq: int | None = None, error: str | None = None,
) -> bool:
    """Store a reported plugin set if it differs from the stored one (and mark the workspace
    seen), unless `seq` is not above the stored report's. False when nothing was written:
    the same report, a stale seq, or a workspace that never registered."""
    digest = report_digest(report, error)
    conditions = [WorkspaceRow.workspace_id == workspace_id, WorkspaceRow.url.is_not(None),
                  WorkspaceRow.report_digest.is_(None) | (WorkspaceRow.report_digest != digest)]
    values: dict[str, object] = {"report": _report_json(report), "report_digest": digest,
                                 "report_at": now, "last_seen_at": now, "runtime_error": error}
    if seq is not None:
        conditions.append(WorkspaceRow.report_seq.is_(None) | (WorkspaceRow.report_seq < seq))
        values["report_seq"] = seq
    result = session.execute(
        update(WorkspaceRow).where(*conditions).values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# Built once: the registry runs this for every group of heartbeats, and building a statement
# costs more than running it.
_STORED_REPORT_DIGESTS = (
    select(WorkspaceRow.workspace_id, WorkspaceRow.report_digest, WorkspaceRow.report_seq)
    .where(WorkspaceRow.workspace_id.in_(bindparam("ids", expanding=True)),
           WorkspaceRow.url.is_not(None)))


def stored_report_digests(connection: Connection, workspace_ids: Collection[str]
                          ) -> dict[str, tuple[str | None, int | None]]:
    """(report digest, report seq) of each of these workspaces that is registered (one
    query)."""
    rows = connection.execute(_STORED_REPORT_DIGESTS, {"ids": list(workspace_ids)})
    return {workspace_id: (digest, seq) for workspace_id, digest, seq in rows}


#: Replicas' clocks and batches may disagree by this much; a stored time further ahead than
#: this can only come from a clock that jumped back, and is not trusted.
CLOCK_SKEW = timedelta(minutes=5)


def touch(session: Session, seen: dict[str, datetime]) -> None:
    """Record batched "still alive" times; never moves last_seen back (batches of several
    replicas arrive out of order) unless it is ahead by more than CLOCK_SKEW (a clock that
    jumped back), and never makes an unregistered workspace look registered. One
    executemany (pipelined by psycopg)."""
    table = Base.metadata.tables[WorkspaceRow.__tablename__]
    session.execute(
        update(table)
        .where(table.c.workspace_id == bindparam("b_id"), table.c.url.is_not(None),
               table.c.last_seen_at.is_(None) | (table.c.last_seen_at < bindparam("b_seen"))
               | (table.c.last_seen_at > bindparam("b_ahead")))
        .values(last_seen_at=bindparam("b_seen")),
        [{"b_id": workspace_id, "b_seen": at, "b_ahead": at + CLOCK_SKEW}
         for workspace_id, at in seen.items()],
    )


def set_dormant(session: Session, workspace_id: str, dormant: bool) -> None:
    _ensure_workspace(session, workspace_id).dormant = dormant


# --- the loop: everything known about many workspaces, in a constant number of queries ----


def _selection(
    now: datetime | None, offline_after: timedelta | None, only: Collection[str] | None
) -> ColumnElement[bool]:
    conditions: list[ColumnElement[bool]] = []
    if now is not None and offline_after is not None:
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


def claim(session: Session, workspace_ids: Collection[str], replica: str, now: datetime,
          until: datetime) -> set[str]:
    """Claim these workspaces for `replica` until `until`: those that no other replica holds
    (or whose claim ran out, or runs out more than CLOCK_SKEW later than a claim made now
    would: a clock that jumped back). One conditional UPDATE: on PostgreSQL a concurrent
    claim of the same row waits for this one to commit and then finds it taken; SQLite has
    a single writer. Returns the ids claimed."""
    if not workspace_ids:
        return set()
    result = session.execute(
        update(WorkspaceRow)
        .where(WorkspaceRow.workspace_id.in_(list(workspace_ids)),
               WorkspaceRow.claimed_by.is_(None) | (WorkspaceRow.claimed_by == replica)
               | (WorkspaceRow.claimed_until < now)
               | (WorkspaceRow.claimed_until > until + CLOCK_SKEW))
        .values(claimed_by=replica, claimed_until=until)
        .returning(WorkspaceRow.workspace_id)
        .execution_options(synchronize_session=False))
    return set(result.scalars())


def claim_of(session: Session, workspace_id: str) -> tuple[str, datetime] | None:
    """Which replica holds a claim on this workspace and until when (it may have run out)."""
    row = session.execute(select(WorkspaceRow.claimed_by, WorkspaceRow.claimed_until)
                          .where(WorkspaceRow.workspace_id == workspace_id)).first()
    if row is None or row.claimed_by is None or row.claimed_until is None:
        return None
    return row.claimed_by, row.claimed_until


def release(session: Session, workspace_ids: Collection[str], replica: str) -> None:
    """Give back this replica's claims on these workspaces."""
    if not workspace_ids:
        return
    session.execute(
        update(WorkspaceRow)
        .where(WorkspaceRow.workspace_id.in_(list(workspace_ids)),
               WorkspaceRow.claimed_by == replica)
        .values(claimed_by=None, claimed_until=None)
        .execution_options(synchronize_session=False))


def load_observed(
    session: Session,
    *,
    now: datetime | None = None,
    offline_after: timedelta | None = None,
    restart_window: timedelta = timedelta(hours=1),
    only: Collection[str] | None = None,
) -> dict[str, Observed]:
    """Observed state of every workspace, or of the online ones when `now` and `offline_after`
    are given, or of `only` these ids. Four queries, however many workspaces there are."""
    selected = _selection(now, offline_after, only)
    # Plain column rows, not ORM objects: this is the hot path of every pass.
    rows = session.execute(select(
        WorkspaceRow.workspace_id, WorkspaceRow.url, WorkspaceRow.registered_at,
        WorkspaceRow.last_seen_at, WorkspaceRow.dormant, WorkspaceRow.report,
        WorkspaceRow.report_at, WorkspaceRow.restart_pending, WorkspaceRow.runtime_error,
    ).where(selected)).all()

    owned: dict[str, dict[str, Plugin]] = defaultdict(dict)
    for owned_row in session.execute(
        select(OwnedPluginRow.workspace_id, OwnedPluginRow.name, OwnedPluginRow.source,
               OwnedPluginRow.digest)
        .join(WorkspaceRow, WorkspaceRow.workspace_id == OwnedPluginRow.workspace_id)
        .where(selected)
    ):
        owned[owned_row.workspace_id][owned_row.name] = Plugin(
            owned_row.name, owned_row.source, owned_row.digest
        )

    attempts: dict[str, dict[str, Attempt]] = defaultdict(dict)
    for attempt_row in session.execute(
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
    if now is not None:
        restart_query = restart_query.where(RestartRow.at > now - restart_window)
    for restart_row in session.execute(restart_query):
        restarts[restart_row.workspace_id].append(restart_row.at)

    return {
        row.workspace_id: Observed(
            workspace_id=row.workspace_id,
            url=row.url,
            registered_at=row.registered_at,
            last_seen_at=row.last_seen_at,
            dormant=row.dormant,
            report=_report(row.report),
            report_at=row.report_at,
            owned=owned.get(row.workspace_id, {}),
            attempts=attempts.get(row.workspace_id, {}),
            restarts=tuple(restarts.get(row.workspace_id, ())),
            restart_pending=row.restart_pending,
            runtime_error=row.runtime_error,
        )
        for row in rows
    }


def apply_many(session: Session, records: list[tuple[Changes, datetime]]) -> None:
    """Record what several workspaces' passes did, on top of whatever is stored now, in a
    fixed number of statements (Core, not the ORM: this runs for every workspace acted on).
    Workspaces deleted meanwhile are skipped."""
    records = [(changes, now) for changes, now in records if not changes.empty]
    if not records:
        return
    table = Base.metadata.tables[WorkspaceRow.__tablename__]
    owned_table = Base.metadata.tables[OwnedPluginRow.__tablename__]
    attempt_table = Base.metadata.tables[AttemptRow.__tablename__]
    ids = sorted({changes.workspace_id for changes, _ in records})
    if session.get_bind().dialect.name == "sqlite":
        # pysqlite opens its transaction at the first write, so the SELECT below would run
        # outside it and a register committed by another process in between would be
        # overwritten. A write that changes nothing takes SQLite's write lock first: the
        # rows read are then the rows updated (what FOR UPDATE does on PostgreSQL).
        session.execute(update(table).where(false()).values(dormant=table.c.dormant))
    # Lock the rows (in a fixed order, so that two writers never deadlock) and read the
    # reports that patches apply to.
    current = {row.workspace_id: (row.report, row.runtime_error, row.report_seq)
               for row in session.execute(
        select(table.c.workspace_id, table.c.report, table.c.runtime_error, table.c.report_seq)
        .where(table.c.workspace_id.in_(ids))
        .order_by(table.c.workspace_id).with_for_update())}
    records = [(changes, now) for changes, now in records if changes.workspace_id in current]
    if not records:
        return

    rows: list[dict[str, object]] = []
    owned_gone: list[dict[str, object]] = []
    owned_new: list[dict[str, object]] = []
    attempts_gone: list[dict[str, object]] = []
    attempts_new: list[dict[str, object]] = []
    restarts: list[dict[str, object]] = []
    forgotten: list[dict[str, object]] = []
    for changes, now in records:
        workspace_id = changes.workspace_id
        row: dict[str, object] = {"b_id": workspace_id, "b_pending": changes.restart_pending,
                                  "b_seq": changes.report_seq}
        if (changes.report_replace is not None or changes.report_put or changes.report_drop
                or changes.report_forget):
            stored, error, stored_seq = current[workspace_id]
            report = _report(stored)
            # A stored report the runtime built after every answer of these actions (a
            # higher seq: it reported since, e.g. right after a restart) already holds their
            # effects: what they saw (a GET /plugins) does not replace it, and a restart does
            # not make it unknown (forgetting it would only cost another GET /plugins).
            newer = (changes.report_seq is not None and stored_seq is not None
                     and stored_seq > changes.report_seq)
            if changes.report_replace is not None and not newer:
                report = plugins_by_name(list(changes.report_replace))
            if report is not None:
                for plugin in changes.report_put:
                    report[plugin.name] = plugin
                for name in changes.report_drop:
                    report.pop(name, None)
            if changes.report_forget and not newer:
                report = None
            row.update(b_touch=True, b_at=now,
                       b_report=None if report is None else _report_json(report.values()),
                       b_digest=None if report is None else report_digest(report.values(),
                                                                           error))
        else:
            row.update(b_touch=False, b_at=None, b_report=None, b_digest=None)
        rows.append(row)
        disowned = set(changes.disown)
        for name in {plugin.name for plugin in changes.own} | disowned:
            owned_gone.append({"b_id": workspace_id, "b_name": name})
        owned_new += [{"workspace_id": workspace_id, "name": plugin.name,
                       "source": plugin.source, "digest": plugin.digest, "installed_at": now}
                      for plugin in changes.own if plugin.name not in disowned]
        for key in set(changes.clear_attempts) | set(changes.attempts):
            attempts_gone.append({"b_id": workspace_id, "b_key": key})
        attempts_new += [{"workspace_id": workspace_id, "key": key, "failures": attempt.failures,
                          "last_error": attempt.last_error[:4000],
                          "last_attempt_at": attempt.last_attempt_at,
                          "next_retry_at": attempt.next_retry_at}
                         for key, attempt in changes.attempts.items()]
        if changes.restarted_at is not None:
            restarts.append({"workspace_id": workspace_id, "at": changes.restarted_at})
        if changes.forget_restarts_before is not None:
            forgotten.append({"b_id": workspace_id, "b_before": changes.forget_restarts_before})

    # Typed parameters; PostgreSQL cannot guess the type of `NULL IS NULL`, hence one cast
    # (booleans cast the same on every backend; datetimes and JSON would not on SQLite).
    touch = bindparam("b_touch", type_=Boolean())
    pending = cast(bindparam("b_pending", type_=Boolean()), Boolean())
    seq = cast(bindparam("b_seq", type_=BigInteger()), BigInteger())
    session.execute(
        update(table).where(table.c.workspace_id == bindparam("b_id"))
        .values(
            # Something happened: the next pass looks at the workspace in full.
            synced_digest=None,
            restart_pending=case((pending.is_(None), table.c.restart_pending), else_=pending),
            report=case((touch, bindparam("b_report", type_=table.c.report.type)),
                        else_=table.c.report),
            report_digest=case((touch, bindparam("b_digest", type_=String(64))),
                               else_=table.c.report_digest),
            report_at=case((touch, bindparam("b_at", type_=table.c.report_at.type)),
                           else_=table.c.report_at),
            # The runtime's seq of what was done: a report it built earlier (lower seq) and
            # that arrives later is then ignored instead of undoing these changes.
            report_seq=case((seq.is_(None), table.c.report_seq),
                            (table.c.report_seq.is_(None), seq),
                            (table.c.report_seq < seq, seq),
                            else_=table.c.report_seq),
        ), rows)
    _replace_rows(session, owned_table, "name", owned_gone, owned_new)
    _replace_rows(session, attempt_table, "key", attempts_gone, attempts_new)
    restart_table = Base.metadata.tables[RestartRow.__tablename__]
    if forgotten:
        session.execute(delete(restart_table).where(
            restart_table.c.workspace_id == bindparam("b_id"),
            restart_table.c.at < bindparam("b_before")), forgotten)
    if restarts:
        session.execute(insert(restart_table), restarts)


def _replace_rows(session: Session, table: Table, key: str, gone: list[dict[str, object]],
                  new: list[dict[str, object]]) -> None:
    """Delete rows by (workspace, `key`) given as b_id/b_<key>, then insert `new` (one
    executemany each)."""
    if gone:
        session.execute(delete(table).where(table.c.workspace_id == bindparam("b_id"),
                                            table.c[key] == bindparam(f"b_{key}")), gone)
    if new:
        session.execute(insert(table), new)


# --- benchmarks: bulk seeding and the naive per-workspace read they compare against -----------


def seed_fleet(session: Session, fleet: list[tuple[str, str, list[Plugin], str]],
               now: datetime) -> None:
    """Insert converged workspaces in bulk: (workspace id, url, installed plugins, token hash).
    The plugins count as installed by the controller."""
    session.execute(insert(WorkspaceRow), [
        {"workspace_id": workspace_id, "url": url, "registered_at": now, "last_seen_at": now,
         "dormant": False, "report": _report_json(plugins), "report_at": now,
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
    return _report(report), owned
