"""Shared by the rollout tests: a template with spec.rollout, its fleet, and its wave order."""

from __future__ import annotations

import asyncio

from controller.agent.simulated import Faults, ReferenceRuntime
from controller.domain import desired as desired_mod
from controller.domain.rollout import Revision, wave_order
from tests.support.helpers import RuntimeFactory, desired_from, workspace_yaml

IDS = [f"ws-{i}" for i in range(10)]
KEY = "default/base"


def template(*extra: str, steps: str = "[10, 50, 100]", bake: int = 60,
             max_failed: int = 0) -> str:
    """Template "base" (seo-all#v1 and notes, plus `extra` sources) rolled out in waves."""
    plugins = "".join(f"    - source: {source}\n" for source in extra)
    return f"""
apiVersion: pluginctl.dev/v1alpha1
kind: WorkspaceTemplate
metadata: {{name: base}}
spec:
  rollout: {{steps: {steps}, bakeSeconds: {bake}, maxFailedWorkspaces: {max_failed}}}
  plugins:
    - source: gitea://org/repo/agent-skills/seo-all#v1
    - source: local://plugins/notes
{plugins}"""


def fleet_of(template_yaml: str) -> desired_mod.Desired:
    return desired_from(template_yaml, *(workspace_yaml(w) for w in IDS))


def order_of(template_yaml: str) -> list[str]:
    """IDS in the rollout order of this template's revision."""
    desired = fleet_of(template_yaml)
    revision = Revision.of(desired.templates[KEY].plugins)
    return wave_order(KEY, revision.digest, IDS)


#: The runtimes the last `start` made: `restarts_over` waits on them.
STARTED: dict[str, ReferenceRuntime] = {}


async def restarts_over() -> None:
    """Wait until the runtimes `start` made have finished every restart asked of them (a
    restart answers 202 and registers again after): a test that moves the clock on at once
    would otherwise date that register after the move, as a crash."""
    await asyncio.gather(*(runtime.restarted() for runtime in STARTED.values()))


async def start(runtime_factory: RuntimeFactory, faults: Faults | None = None
                ) -> dict[str, ReferenceRuntime]:
    """A registered reference runtime for each of IDS."""
    runtimes = STARTED
    runtimes.clear()
    for workspace_id in IDS:
        runtimes[workspace_id] = await runtime_factory(workspace_id, faults=faults)
        await runtimes[workspace_id].register()
    return runtimes
