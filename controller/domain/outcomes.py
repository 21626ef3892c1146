"""Turns what the executor brought back into the facts the store records: reports, ownership,
backoff, restarts. Pure: the store applies the result in one transaction."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from controller.domain import backoff
from controller.domain.models import ActionKind, Attempt, Observed, Outcome, Plugin, Policy


@dataclass(frozen=True)
class Changes:
    """Patches for one workspace. Report changes are patches, not a new report, so that a
    heartbeat recorded while the pass ran is built on rather than overwritten."""

    workspace_id: str
    report_replace: tuple[Plugin, ...] | None = None  # the runtime answered GET /plugins
    report_put: tuple[Plugin, ...] = ()  # installed during this pass
    report_drop: tuple[str, ...] = ()  # removed during this pass
    report_forget: bool = False  # restarted: what it has is unknown until it reports again
    report_seq: int | None = None  # the runtime's highest seq among these actions' answers
    own: tuple[Plugin, ...] = ()
    disown: tuple[str, ...] = ()
    attempts: Mapping[str, Attempt] = field(default_factory=dict)
    clear_attempts: tuple[str, ...] = ()
    restarted_at: datetime | None = None
    # With a restart: the workspace's restarts before this count for nothing any more (they
    # left the budget window) and are deleted, so the table holds one window's worth.
    forget_restarts_before: datetime | None = None
    restart_pending: bool | None = None  # None: leave as it is

    @property
    def empty(self) -> bool:
        return self == Changes(self.workspace_id)


def changes_from(
    observed: Observed,
    outcomes: list[Outcome],
    now: datetime,
    *, policy: Policy,
    rand: Callable[[], float],
) -> Changes:
    report_replace: tuple[Plugin, ...] | None = None
    report_put: list[Plugin] = []
    report_drop: list[str] = []
    own: list[Plugin] = []
    disown: list[str] = []
    attempts: dict[str, Attempt] = {}
    clear: list[str] = []
    restarted_at: datetime | None = None
    restart_pending: bool | None = None
    seqs = [o.seq for o in outcomes if o.ok and o.seq is not None]

    for outcome in outcomes:
        action = outcome.action
        key = action.key
        if not outcome.ok:
            previous = attempts.get(key) or observed.attempts.get(key)
            attempts[key] = backoff.after_failure(previous, outcome.message, now, policy=policy,
                                                  rand=rand())
            if action.kind is ActionKind.RESTART:
                restart_pending = True
            continue
        if key in observed.attempts and key not in clear:
            clear.append(key)
        attempts.pop(key, None)
        match action.kind:
            case ActionKind.OBSERVE:
                report_replace = outcome.report or ()
            case ActionKind.INSTALL if action.plugin is not None:
                plugin = action.plugin
                report_put.append(Plugin(plugin.name, plugin.source,
                                         outcome.digest or plugin.digest))
                own.append(action.plugin)
                if outcome.restart_required and restart_pending is None:
                    restart_pending = True
            case ActionKind.REMOVE if action.plugin is not None:
                report_drop.append(action.plugin.name)
                disown.append(action.plugin.name)
                if outcome.restart_required and restart_pending is None:
                    restart_pending = True
            case ActionKind.DISOWN if action.plugin is not None:
                disown.append(action.plugin.name)
            case ActionKind.RESTART:
                restarted_at = now
                restart_pending = False
    if restarted_at is not None:
        restart_pending = False  # the restart covers every install that asked for one

    return Changes(
        workspace_id=observed.workspace_id,
        report_replace=report_replace,
        report_put=tuple(report_put),
        report_drop=tuple(report_drop),
        report_forget=restarted_at is not None,
        report_seq=max(seqs) if seqs else None,
        own=tuple(own),
        disown=tuple(disown),
        attempts=attempts,
        clear_attempts=tuple(clear),
        restarted_at=restarted_at,
        forget_restarts_before=(None if restarted_at is None
                                else restarted_at - policy.restart_window),
        restart_pending=restart_pending,
    )
