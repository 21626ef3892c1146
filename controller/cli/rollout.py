"""`pluginctl rollout status|resume|abort|promote TEMPLATE`: a template's progressive rollout,
told and steered. Standalone (--manifests) and in a cluster (--kubernetes) alike: the
rollout's state is in the controller's database."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from controller.cli.base import (
    EXIT_DRIFT,
    EXIT_OK,
    Failure,
    cli,
    db_option,
    desired_state,
    iso,
    kubernetes_options,
    manifests_option,
    open_store,
    output_option,
)
from controller.domain.models import Policy, utcnow
from controller.domain.rollout import RolloutError, RolloutPhase, Summary
from controller.engine import rollouts

NEXT_STEPS = {
    RolloutPhase.HALTED: "after a fix: `pluginctl rollout resume {t}`; or `pluginctl rollout "
                         "abort {t}` (back to the previous revision)",
    RolloutPhase.PROGRESSING: "`pluginctl rollout promote {t}` skips the remaining waves; "
                              "`pluginctl rollout abort {t}` goes back",
    RolloutPhase.ABORTED: "a new revision of the template starts a rollout of its own",
}


def template_key(template: str) -> str:
    """"namespace/name", or "name" in the default namespace."""
    if template.count("/") > 1 or not all(template.split("/")):
        raise click.BadParameter(f"{template!r}: give NAME or NAMESPACE/NAME")
    return template if "/" in template else f"default/{template}"


@cli.group("rollout")
def rollout_group() -> None:
    """Progressive rollouts of template changes (spec.rollout): status, resume, abort,
    promote."""


@rollout_group.command("status")
@click.argument("template")
@manifests_option(required=False)
@kubernetes_options
@db_option
@output_option
@click.option("--offline-after", type=click.FloatRange(min=1), default=90.0, show_default=True)
def status_command(*, template: str, manifests: Path | None, use_kubernetes: bool,
                   kubeconfig: str | None, kube_context: str | None, db: str | None,
                   output: str, offline_after: float) -> None:
    """Where TEMPLATE's rollout stands: revision, wave, updated/healthy/failed workspaces,
    time left in the bake, why it halted.

    Exit 0: complete. Exit 2: in progress, halted or aborted. Exit 1: could not run."""
    key = template_key(template)
    desired = desired_state(manifests, use_kubernetes, kubeconfig, kube_context)
    sessions = open_store(db)
    policy = Policy(offline_after=timedelta(seconds=offline_after))
    now = utcnow()

    async def look() -> Summary:
        gated = await rollouts.gate(desired, sessions, policy, now=now, advance=False)
        return await rollouts.summarize(gated, key, sessions, policy, now=now)

    try:
        summary = asyncio.run(look())
    except RolloutError as error:
        raise Failure(str(error)) from error
    if output == "json":
        click.echo(json.dumps(summary_json(summary), indent=2))
    else:
        click.echo(summary_text(summary))
    sys.exit(EXIT_OK if summary.done else EXIT_DRIFT)


def summary_text(s: Summary) -> str:
    r = s.rollout
    if r.target is None:
        return "\n".join([
            f"Template:   {s.template}",
            f"State:      Complete: every workspace on revision {r.stable.short}"
            + (f" ({r.message})" if r.message else ""),
            f"Workspaces: {s.total}",
            "Rollout:    " + ("steps " + ", ".join(f"{p}%" for p in s.steps) if s.steps
                                  else "none (no spec.rollout: a change goes to every "
                                       "workspace at once)"),
        ])
    waves = len(s.steps) or 1
    percent = s.steps[min(r.wave, waves - 1)] if s.steps else 100
    lines = [
        f"Template:   {s.template}",
        f"State:      {r.phase.value}"
        + (f", wave {r.wave + 1} of {waves} ({percent}%)"
           if r.phase is not RolloutPhase.ABORTED else ""),
        f"Revision:   {r.target.short} (previous: {r.stable.short}), since "
        f"{r.started_at:%Y-%m-%d %H:%M:%S} UTC" if r.started_at else
        f"Revision:   {r.target.short} (previous: {r.stable.short})",
        f"Workspaces: {s.total}: {s.updated} updated, {s.healthy} healthy, "
        f"{len(s.failed)} failed, {s.total - s.updated} on the previous revision",
    ]
    if r.phase is RolloutPhase.PROGRESSING:
        lines.append("Bake:       " + (
            f"{_duration(s.bake_left)} left of healthy time before the next wave"
            if s.bake_left is not None else "waits for the wave to be in sync and healthy"))
    if r.message:
        lines.append(f"Why:        {r.message}" if r.phase is RolloutPhase.HALTED
                     else f"Last:       {r.message}")
    for workspace_id, problem in s.failed[:10]:
        lines.append(f"  failed:   {workspace_id}: {problem}")
    if r.phase in NEXT_STEPS:
        lines.append("Next:       " + NEXT_STEPS[r.phase].format(t=s.template))
    return "\n".join(lines)


def _duration(value: timedelta | None) -> str:
    seconds = int(value.total_seconds()) if value is not None else 0
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def summary_json(s: Summary) -> dict[str, Any]:
    r = s.rollout
    return {
        "template": s.template, "phase": r.phase.value,
        "wave": r.wave + 1 if r.target is not None else None,
        "waves": len(s.steps) or None, "steps": list(s.steps),
        "revision": r.target.digest if r.target else r.stable.digest,
        "previous_revision": r.stable.digest if r.target else None,
        "started_at": iso(r.started_at), "workspaces": s.total, "updated": s.updated,
        "healthy": s.healthy,
        "failed": [{"workspace_id": w, "problem": p} for w, p in s.failed],
        "bake_left_seconds": s.bake_left.total_seconds() if s.bake_left is not None else None,
        "message": r.message,
    }


def _command(action: str, template: str, db: str | None) -> None:
    key = template_key(template)
    sessions = open_store(db)
    try:
        done = asyncio.run(rollouts.command(sessions, key, action, now=utcnow()))
    except RolloutError as error:
        raise Failure(str(error)) from error
    click.echo(f"template {key}: {done.message} (the next pass acts on it)")


@rollout_group.command("resume")
@click.argument("template")
@db_option
def resume_command(*, template: str, db: str | None) -> None:
    """Go on with TEMPLATE's halted rollout (after a fix): failures before now no longer
    count. A new revision of the template restarts from the first wave by itself."""
    _command("resume", template, db)


@rollout_group.command("abort")
@click.argument("template")
@db_option
def abort_command(*, template: str, db: str | None) -> None:
    """Give up TEMPLATE's rollout: the workspaces already moved go back to the previous
    revision (what it added is removed, changed sources reinstalled as they were)."""
    _command("abort", template, db)


@rollout_group.command("promote")
@click.argument("template")
@db_option
def promote_command(*, template: str, db: str | None) -> None:
    """Skip the remaining waves of TEMPLATE's rollout: every workspace gets the new revision
    in the next pass."""
    _command("promote", template, db)
