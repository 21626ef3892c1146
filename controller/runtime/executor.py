"""The executor: performs one workspace's plan through the runtime driver, in order, and
reports an Outcome per action. It decides nothing the planner did not, except the single
restart a pass may make when a call asked for one and the plan allows it."""

from __future__ import annotations

from controller.domain.models import Action, ActionKind, Outcome, WorkspacePlan
from controller.runtime.driver import RuntimeCallError, RuntimeDriver


async def perform(driver: RuntimeDriver, url: str, action: Action, *,
                  workspace_id: str | None = None) -> Outcome:
    try:
        match action.kind:
            case ActionKind.OBSERVE:
                report, seq = await driver.list_plugins(url, workspace_id)
                return Outcome(action, ok=True, report=tuple(report), seq=seq)
            case ActionKind.INSTALL if action.plugin is not None:
                result = await driver.install(url, action.plugin, workspace_id)
                return Outcome(action, ok=True, restart_required=result.restart_required,
                               digest=result.digest, seq=result.seq)
            case ActionKind.REMOVE if action.plugin is not None:
                removed = await driver.remove(url, action.plugin.name, workspace_id)
                return Outcome(action, ok=True, restart_required=removed.restart_required,
                               seq=removed.seq)
            case ActionKind.DISOWN:
                return Outcome(action, ok=True)
            case ActionKind.RESTART:
                await driver.restart(url, workspace_id)
                return Outcome(action, ok=True)
            case _:
                return Outcome(action, ok=False, message=f"malformed action {action!r}")
    except RuntimeCallError as error:
        return Outcome(action, ok=False, message=str(error))


async def execute(
    driver: RuntimeDriver, url: str, plan: WorkspacePlan, *, outcomes: list[Outcome]
) -> None:
    """Perform the plan's actions one after another (a runtime is one box: no point racing
    its installs), then at most one restart. Outcomes are appended to `outcomes` as they come,
    so that a caller that gives up on a slow runtime still keeps what was done."""
    restart: Action | None = None
    for action in plan.actions:
        if action.kind is ActionKind.RESTART:
            restart = action
            continue
        outcomes.append(await perform(driver, url, action, workspace_id=plan.workspace_id))
    asked = [o.action.plugin.name for o in outcomes if o.restart_required and o.action.plugin]
    if restart is None and asked and plan.may_restart:
        restart = Action(ActionKind.RESTART, "requested by " + ", ".join(asked))
    if restart is not None:
        outcomes.append(await perform(driver, url, restart, workspace_id=plan.workspace_id))
