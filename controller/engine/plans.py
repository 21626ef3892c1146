"""Plan and apply. `pluginctl plan` writes the actions a pass would take now, each
workspace's with a fingerprint of the state they were planned against; `pluginctl apply`
performs exactly those actions and nothing else, and refuses — doing nothing at all — when
any of those states has changed since (desired state, the runtime's report, or pluginctl's
own records: another pass acted meanwhile), or when a replica is acting on one of them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal

import pydantic

from controller.domain import planner
from controller.domain.desired import Desired
from controller.domain.models import (
    Action,
    ActionKind,
    DesiredWorkspace,
    Observed,
    Plugin,
    Policy,
    Wait,
    WorkspacePlan,
    utcnow,
)
from controller.domain.wire import PluginReport, WorkspaceId, describe_errors
from controller.engine import act, rollouts
from controller.engine.act import claim_seconds
from controller.engine.context import DEFAULT_REPLICA, PassContext
from controller.engine.passes import Weight
from controller.engine.queue import Trigger
from controller.engine.report import PassReport, WorkspaceResult
from controller.runtime.driver import RuntimeDriver
from controller.store import DatabaseError, Sessions, in_thread, queries

log = logging.getLogger("pluginctl.plans")

PLAN_KIND = "pluginctl/Plan"
PLAN_VERSION = 1


class PlanError(Exception):
    """A plan file that cannot be used, or a plan that may not be applied now; the message
    says why, and nothing was done."""


# --- the state a workspace's actions were planned against ------------------------------------

def _hash(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _plugins(plugins: Mapping[str, Plugin] | None) -> list[list[str | bool | None]] | None:
    if plugins is None:
        return None
    return [[p.name, p.source, p.digest, p.modified] for _, p in sorted(plugins.items())]


def fingerprint(wanted: DesiredWorkspace, seen: Observed) -> dict[str, str]:
    """What a plan for this workspace depends on, in three parts so that a refusal can say
    which changed. Heartbeat times are left out: they move all the time and change nothing."""
    return {
        "desired": wanted.digest,
        "runtime": _hash([seen.url, seen.registered_at, _plugins(seen.report)]),
        "records": _hash([_plugins(seen.owned), sorted(
            (key, a.failures, a.next_retry_at) for key, a in seen.attempts.items()),
            seen.restarts, seen.restart_pending]),
    }


_CHANGED = {"desired": "its desired state changed", "runtime": "its runtime's report changed",
            "records": "pluginctl acted on it since (its records changed)"}


# --- the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedWorkspace:
    workspace_id: str
    state: Mapping[str, str]
    actions: tuple[Action, ...]
    waits: tuple[Wait, ...] = ()


@dataclass(frozen=True)
class Plan:
    created_at: datetime
    workspaces: tuple[PlannedWorkspace, ...]  # those with actions or waits
    online: int
    guard: str | None  # the blast-radius guard would hold this plan: why
    invalid: tuple[DesiredWorkspace, ...] = ()

    @property
    def actions(self) -> int:
        return sum(len(w.actions) for w in self.workspaces)


async def make_plan(desired: Desired, sessions: Sessions, policy: Policy) -> Plan:
    """What a pass would do now, over every online workspace, and against what. A workspace
    of a template rolling out is planned at the revision its wave allows: its fingerprint's
    desired digest is that revision's, so `apply` refuses once the rollout moved on."""
    now = utcnow()
    desired = (await rollouts.gate(desired, sessions, policy, now=now, advance=False)).desired
    observed = await in_thread(sessions, partial(
        queries.load_observed, now=now, offline_after=policy.offline_after,
        restart_window=policy.restart_window))
    planned: list[PlannedWorkspace] = []
    invalid: list[DesiredWorkspace] = []
    weight = Weight()
    declared = 0
    for workspace_id in sorted(observed):
        wanted = desired.workspaces.get(workspace_id)
        if wanted is None or wanted.suspended:
            continue
        if wanted.error is not None:
            invalid.append(wanted)
            continue
        seen = observed[workspace_id]
        plan = planner.plan(wanted, seen, now, policy)
        declared += len(wanted.plugins)
        weight.add(plan)
        if plan.actions or plan.waits:
            planned.append(PlannedWorkspace(
                workspace_id=workspace_id, state=fingerprint(wanted, seen),
                actions=plan.actions, waits=plan.waits))
    held = planner.blast_radius(weight.removals, declared, weight.workspaces, policy)
    return Plan(created_at=now, workspaces=tuple(planned), online=len(observed),
                guard=None if held is None else str(held), invalid=tuple(invalid))


def plan_json(plan: Plan) -> dict[str, Any]:
    def action(a: Action) -> dict[str, Any]:
        return {"action": a.kind.value, "plugin": a.plugin.to_json() if a.plugin else None,
                "reason": a.reason}

    return {
        "kind": PLAN_KIND, "version": PLAN_VERSION,
        "created_at": plan.created_at.isoformat(),
        "online": plan.online,
        "guard": plan.guard,
        "workspaces": [{
            "workspace_id": w.workspace_id, "planned_against": dict(w.state),
            "actions": [action(a) for a in w.actions],
            "waits": [{"kind": x.kind.value, "key": x.key, "reason": x.reason,
                       "until": x.until.isoformat() if x.until else None} for x in w.waits],
        } for w in plan.workspaces],
        "invalid": [{"workspace_id": d.workspace_id, "object": d.object_ref, "error": d.error}
                    for d in plan.invalid],
    }


# --- reading a plan file (strict: anything unexpected is an error, nothing is done) ----------

class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)


class _ActionDoc(_Strict):
    action: Literal["observe", "install", "remove", "disown", "restart"]
    plugin: PluginReport | None = None  # name, source, digest: as the registry checks them
    reason: str = ""

    @pydantic.model_validator(mode="after")
    def _needs_plugin(self) -> _ActionDoc:
        if self.action in ("install", "remove", "disown") and self.plugin is None:
            raise ValueError(f"{self.action} actions need a plugin")
        return self


class _WorkspaceDoc(_Strict):
    workspace_id: WorkspaceId
    planned_against: dict[str, str]
    actions: list[_ActionDoc]

    @pydantic.field_validator("planned_against")
    @classmethod
    def _complete(cls, value: dict[str, str]) -> dict[str, str]:
        if set(value) != set(_CHANGED):
            raise ValueError(f"needs {', '.join(sorted(_CHANGED))}")
        return value


class _PlanDoc(_Strict):
    kind: Literal["pluginctl/Plan"]
    version: Literal[1]
    created_at: datetime
    guard: str | None = None
    workspaces: list[_WorkspaceDoc]


def read_plan(text: str, origin: str) -> Plan:
    """A plan from the text of a plan file; PlanError says what is wrong and where."""
    try:
        doc = _PlanDoc.model_validate_json(text)
    except pydantic.ValidationError as error:
        raise PlanError(f"{origin} is not a usable plan: {describe_errors(error)}") from error
    seen: set[str] = set()
    workspaces = []
    for index, w in enumerate(doc.workspaces):
        if w.workspace_id in seen:
            raise PlanError(f"{origin} is not a usable plan: workspaces[{index}]: "
                            f"{w.workspace_id} appears twice")
        seen.add(w.workspace_id)
        actions = tuple(Action(ActionKind(a.action), a.reason,
                               a.plugin.to_plugin() if a.plugin else None) for a in w.actions)
        workspaces.append(PlannedWorkspace(workspace_id=w.workspace_id,
                                           state=dict(w.planned_against), actions=actions))
    return Plan(created_at=doc.created_at, workspaces=tuple(workspaces), online=0,
                guard=doc.guard)


# --- applying it ------------------------------------------------------------------------------

async def apply_plan(
    desired: Desired,
    sessions: Sessions,
    driver: RuntimeDriver,
    policy: Policy,
    *,
    plan: Plan,
    dry_run: bool = False,
    force: bool = False,
    replica: str = DEFAULT_REPLICA,
    rand: Callable[[], float] = random.random,
) -> PassReport:
    """Perform exactly the plan's actions, after checking — under a claim on each of its
    workspaces, so that no pass acts on them meanwhile — that every state they were planned
    against still holds. Raises PlanError (and does nothing) if one does not, or if the
    plan was held by the blast-radius guard and is not forced. An install that asks for a
    restart leaves it pending for the next pass or plan: only planned restarts happen."""
    if plan.guard is not None and not force:
        raise PlanError(f"the blast-radius guard held this plan: it {plan.guard}; apply it "
                        "with --force if that is intended")
    todo = [w for w in plan.workspaces if w.actions]
    desired = (await rollouts.gate(desired, sessions, policy, now=utcnow(),
                                   advance=False)).desired
    ctx = PassContext(desired=desired, sessions=sessions, driver=driver, policy=policy,
                      now=utcnow(), limit=asyncio.Semaphore(max(1, policy.concurrency)),
                      rand=rand, replica=replica, dry_run=dry_run, trigger=Trigger.MANUAL)
    hold = timedelta(seconds=claim_seconds(policy))
    claimed = await act.claim(ctx, [w.workspace_id for w in todo], until=ctx.now + hold,
                              read_all=True)
    try:
        problems = _problems(todo, ctx, claimed)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                                if len(problems) > 5 else "")
            raise PlanError(f"the state this plan was made against has changed, so nothing "
                            f"was done (make a new plan): {shown}")
    except BaseException:
        await _release(ctx, claimed.ids)
        raise
    if dry_run:
        results = [WorkspaceResult(workspace_id=w.workspace_id, plans=(_workspace_plan(w),),
                                   trigger=Trigger.MANUAL) for w in todo]
        return PassReport(started_at=ctx.now, finished_at=utcnow(), dry_run=True,
                          results=tuple(results))
    applying = _Applying(ctx, claimed, hold=hold)
    renewing = asyncio.create_task(applying.keep_claimed())
    try:
        results = await asyncio.gather(*(applying.one(w) for w in todo))
    finally:
        applying.waiting.clear()
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
        await _release(ctx, claimed.ids)  # recorded ones are released already
    return PassReport(started_at=ctx.now, finished_at=utcnow(), dry_run=False,
                      results=tuple(results))


class _Applying:
    """The acting half of one apply: each planned workspace in its turn, through the same
    step as a pass (act.execute_workspace), its claim renewed while it waits."""

    def __init__(self, ctx: PassContext, claimed: act.Claimed, *, hold: timedelta) -> None:
        self.ctx = ctx
        self.observed = claimed.observed
        self.hold = hold
        self.recorder = act.Recorder(ctx.sessions, ctx.replica)
        self.waiting = set(claimed.ids)  # claimed, not yet acted on: claims kept alive
        self.lost: set[str] = set()  # claims another replica took meanwhile

    async def keep_claimed(self) -> None:
        """A big plan outlasts one claim: renew the claims of the workspaces still waiting
        for their turn, so that no pass can act on them before this apply does."""
        while self.waiting:
            await asyncio.sleep(self.hold.total_seconds() / 3)
            ids = sorted(self.waiting)
            try:
                kept = await in_thread(self.ctx.sessions, partial(
                    queries.claim, workspace_ids=ids, replica=self.ctx.replica, now=utcnow(),
                    until=utcnow() + self.hold))
            except DatabaseError as error:  # retried at the next renewal; claims still hold
                log.warning("could not renew the claims of this apply: %s", error)
                continue
            self.lost.update(set(ids) - kept)

    async def one(self, planned: PlannedWorkspace) -> WorkspaceResult:
        seen = self.observed[planned.workspace_id]
        async with self.ctx.limit:
            self.waiting.discard(seen.workspace_id)
            if seen.workspace_id in self.lost:
                return WorkspaceResult.unacted(
                    seen, _workspace_plan(planned), trigger=Trigger.MANUAL,
                    error="not acted on: another replica took its claim meanwhile")
            return await act.execute_workspace(
                self.ctx, seen, _workspace_plan(planned), wanted=None, recorder=self.recorder,
                deadline=self.ctx.policy.workspace_timeout)


def _workspace_plan(planned: PlannedWorkspace) -> WorkspacePlan:
    return WorkspacePlan(workspace_id=planned.workspace_id, actions=planned.actions, waits=(),
                         may_restart=False, restart_pending=False)


def _problems(todo: list[PlannedWorkspace], ctx: PassContext, claimed: act.Claimed
              ) -> list[str]:
    problems = []
    for planned in todo:
        workspace_id = planned.workspace_id
        wanted = ctx.desired.workspaces.get(workspace_id)
        seen = claimed.observed.get(workspace_id)
        if wanted is None:
            problems.append(f"{workspace_id}: no longer declared")
        elif wanted.error is not None:
            problems.append(f"{workspace_id}: its desired state is invalid: {wanted.error}")
        elif wanted.suspended:
            problems.append(f"{workspace_id}: suspended")
        elif seen is None or seen.url is None:
            problems.append(f"{workspace_id}: not online any more")
        else:
            now_state = fingerprint(wanted, seen)
            changed = [_CHANGED[part] for part in sorted(_CHANGED)
                       if now_state[part] != planned.state.get(part)]
            if changed:
                problems.append(f"{workspace_id}: {', '.join(changed)}")
            elif not ctx.dry_run and workspace_id not in claimed.ids:
                problems.append(f"{workspace_id}: another replica is acting on it right now")
    return problems


async def _release(ctx: PassContext, claimed: frozenset[str]) -> None:
    with contextlib.suppress(DatabaseError):  # else the claims run out on their own
        await act.release(ctx, claimed)
