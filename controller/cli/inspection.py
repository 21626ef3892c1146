"""The commands that look without acting: `status` (every workspace) and `explain` (why
one workspace is or is not in sync)."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click

from controller.cli.base import (
    EXIT_DRIFT,
    EXIT_OK,
    Failure,
    allow_unpinned_option,
    cli,
    clip,
    db_option,
    desired_state,
    iso,
    kubernetes_options,
    manifests_option,
    open_store,
    output_option,
    when,
    workspace_id_arg,
)
from controller.domain import status
from controller.domain.explain import Claim, Explanation, age, explain
from controller.domain.models import Policy, utcnow
from controller.domain.render import table
from controller.engine import rollouts
from controller.store import queries, transaction

# --- status ----------------------------------------------------------------------------------

@cli.command("status")
@db_option
@manifests_option(required=False)
@kubernetes_options
@output_option
@click.option("--offline-after", type=click.FloatRange(min=1), default=90.0, show_default=True)
@allow_unpinned_option
def status_command(*, db: str | None, manifests: Path | None, use_kubernetes: bool,
                   kubeconfig: str | None, kube_context: str | None, output: str,
                   offline_after: float, allow_unpinned: bool) -> None:
    """Per workspace: phase, desired vs installed, drift, last error, next retry.

    Without --manifests or --kubernetes only what runtimes reported is known (no desired
    plugins)."""
    desired = desired_state(manifests, use_kubernetes, kubeconfig, kube_context) \
        if manifests is not None or use_kubernetes else None
    sessions = open_store(db)
    policy = Policy(offline_after=timedelta(seconds=offline_after),
                    allow_unpinned=allow_unpinned)
    now = utcnow()
    if desired is not None:  # each workspace held to the revision its rollout wave allows
        desired = asyncio.run(rollouts.gate(desired, sessions, policy, now=now,
                                            advance=False)).desired
    with transaction(sessions) as session:
        observed = queries.load_observed(session, now=now, restart_window=policy.restart_window)
    wanted = dict(desired.workspaces) if desired else {}
    ids = sorted(set(observed) | set(wanted))
    statuses = [status.build(wanted.get(i), observed.get(i), now, policy,
                             desired_known=desired is not None) for i in ids]
    if desired is not None:
        statuses += [status.build(d, observed.get(d.workspace_id), now, policy)
                     for d in desired.rejected]
    if output == "json":
        click.echo(json.dumps({"workspaces": [status_json(s) for s in statuses],
                               "manifest_errors": [str(e) for e in desired.errors]
                               if desired else []}, indent=2))
        return
    rows = [[s.workspace_id, s.phase.value, f"{s.installed}/{s.desired}" if desired else "-",
             "yes" if s.in_sync else "no", ", ".join(s.drift) or "-",
             clip(s.error or "-"), when(s.next_retry_at) if s.next_retry_at else "-"]
            for s in statuses]
    click.echo(table(["WORKSPACE", "PHASE", "PLUGINS", "IN-SYNC", "DRIFT", "LAST ERROR",
                      "NEXT RETRY"], rows) if rows else "no workspaces")
    if desired:
        for error in desired.errors:
            click.echo(f"error: {error}", err=True)


def status_json(s: status.WorkspaceStatus) -> dict[str, Any]:
    return {
        "workspace_id": s.workspace_id,
        "object": s.object_ref,
        "template": s.template,
        "phase": s.phase.value,
        "desired": s.desired,
        "installed": s.installed,
        "in_sync": s.in_sync,
        "drift": list(s.drift),
        "plugins": [{"name": p.name, "source": p.source, "state": p.state.value,
                     "message": p.message, "attempts": p.attempts,
                     "next_retry_at": iso(p.next_retry_at)} for p in s.plugins],
        "last_error": s.error,
        "next_retry_at": iso(s.next_retry_at),
        "restart_pending": s.restart_pending,
        "restarts_left": s.restarts_left,
        "last_seen_at": iso(s.last_seen_at),
        "report_at": iso(s.report_at),
    }


@cli.command("explain")
@click.argument("workspace_id", callback=lambda _c, _p, value: workspace_id_arg(value))
@manifests_option(required=False)
@kubernetes_options
@db_option
@output_option
@click.option("--offline-after", type=click.FloatRange(min=1), default=90.0, show_default=True)
@click.option("--restart-budget", type=click.IntRange(min=0), default=3, show_default=True)
@allow_unpinned_option
def explain_command(*, workspace_id: str, manifests: Path | None, use_kubernetes: bool,
                    kubeconfig: str | None, kube_context: str | None, db: str | None,
                    output: str, offline_after: float, restart_budget: int,
                    allow_unpinned: bool) -> None:
    """Why WORKSPACE_ID is or is not in sync: which template or Workspace entry declares each
    plugin, what its runtime last reported and when, what pluginctl owns, the last error, the
    next retry, the restart budget left, and what the next pass would do.

    Exit 0: in sync. Exit 2: not in sync. Exit 1: no such workspace, or could not run."""
    desired = desired_state(manifests, use_kubernetes, kubeconfig, kube_context)
    sessions = open_store(db)
    policy = Policy(offline_after=timedelta(seconds=offline_after),
                    restart_budget=restart_budget, allow_unpinned=allow_unpinned)
    now = utcnow()
    gated = asyncio.run(rollouts.gate(desired, sessions, policy, now=now, advance=False))
    desired = gated.desired
    wanted = desired.workspaces.get(workspace_id) or next(
        (d for d in desired.rejected if d.workspace_id == workspace_id), None)
    with transaction(sessions) as session:
        seen = queries.load_observed(session, now=now, restart_window=policy.restart_window,
                                     only=[workspace_id]).get(workspace_id)
        held = queries.claim_of(session, workspace_id)
    if wanted is None and seen is None:
        raise Failure(f"no workspace {workspace_id}: no Workspace declares it and no runtime "
                      "has registered it")
    found = explain(wanted, seen, now, policy=policy,
                    claim=Claim(*held) if held is not None else None)
    rollout_note = rollouts.note(gated, workspace_id)
    if output == "json":
        click.echo(json.dumps({**explanation_json(found), "rollout": rollout_note}, indent=2))
    else:
        text = explanation_text(found, now)
        if rollout_note:  # after the Why line: which revision, and why that one
            head, _, rest = text.partition("\nRuntime:")
            text = f"{head}\nRollout:        {rollout_note}\nRuntime:{rest}"
        click.echo(text)
    sys.exit(EXIT_OK if found.in_sync else EXIT_DRIFT)


def explanation_text(found: Explanation, now: datetime) -> str:
    def ago(value: datetime | None) -> str:
        return f"{age(value, now)} ago ({value:%Y-%m-%d %H:%M:%S} UTC)" if value else "never"

    origin = ", ".join(part for part in (
        found.object_ref and f"object {found.object_ref}",
        found.template and f"template {found.template}") if part)
    lines = [
        f"Workspace:      {found.workspace_id}" + (f" ({origin})" if origin else ""),
        f"Phase:          {found.phase.value}",
        f"In sync:        {'yes' if found.in_sync else 'no'}",
        f"Why:            {found.verdict}",
        f"Runtime:        {found.url or '-'}",
        f"Registered:     {ago(found.registered_at)}",
        f"Last heartbeat: {ago(found.last_seen_at)}",
        f"Last report:    {ago(found.report_at)}",
        "Acting replica: " + (f"{found.claim.replica} (claim runs out {when(found.claim.until)})"
                              if found.claim else "none"),
        f"Restarts:       {found.restarts_used} of {found.restart_budget} used in the last "
        f"hour, {max(0, found.restart_budget - found.restarts_used)} left"
        + (f"; the oldest leaves the window {when(found.restart_budget_frees_at)}"
           if found.restart_budget_frees_at else "")
        + ("; a restart is pending" if found.restart_pending else ""),
    ]
    if found.runtime_error:
        lines.append(f"Runtime error:  {found.runtime_error}" + (
            f" (next try {when(found.runtime_next_retry_at)})"
            if found.runtime_next_retry_at else ""))
    lines.append("")
    if found.plugins:
        rows = [[p.name, p.declared_by or "not declared",
                 p.installed.source if p.installed else "-", p.owner, p.state,
                 p.message or "-", str(p.failures) if p.failures else "-",
                 when(p.next_retry_at) if p.next_retry_at else "-"] for p in found.plugins]
        lines.append(table(["PLUGIN", "DECLARED BY", "INSTALLED", "OWNER", "STATE", "DETAIL",
                            "FAILURES", "NEXT RETRY"], rows))
    else:
        lines.append("No plugins declared or reported.")
    lines += ["", "Next pass:"] + [f"  {line}" for line in found.next_pass]
    return "\n".join(lines)


def explanation_json(found: Explanation) -> dict[str, Any]:
    return {
        "workspace_id": found.workspace_id, "object": found.object_ref,
        "template": found.template, "phase": found.phase.value, "in_sync": found.in_sync,
        "why": found.verdict, "url": found.url,
        "registered_at": iso(found.registered_at), "last_seen_at": iso(found.last_seen_at),
        "report_at": iso(found.report_at),
        "plugins": [{"name": p.name, "declared_by": p.declared_by,
                     "wanted": p.wanted.to_json() if p.wanted else None,
                     "installed": p.installed.to_json() if p.installed else None,
                     "owner": p.owner, "state": p.state, "message": p.message,
                     "failures": p.failures, "next_retry_at": iso(p.next_retry_at)}
                    for p in found.plugins],
        "runtime_error": found.runtime_error,
        "runtime_next_retry_at": iso(found.runtime_next_retry_at),
        "restart_pending": found.restart_pending,
        "restarts_used": found.restarts_used, "restart_budget": found.restart_budget,
        "restarts_left": max(0, found.restart_budget - found.restarts_used),
        "restart_budget_frees_at": iso(found.restart_budget_frees_at),
        "acting_replica": ({"replica": found.claim.replica, "until": iso(found.claim.until)}
                           if found.claim else None),
        "next_pass": list(found.next_pass),
    }
