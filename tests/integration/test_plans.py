"""`apply` on a real store and real runtimes: a plan that outlasts one claim keeps every
workspace it has not reached yet claimed, so no pass of a running controller acts on them
before it does."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from controller.agent.simulated import Faults
from controller.domain.models import Policy
from controller.engine import plans
from controller.engine.passes import reconcile_once
from controller.runtime.driver import RuntimeDriver
from controller.store import Sessions
from tests.support.helpers import NOTES, SEO, RuntimeFactory, fleet, has

CLAIM = 3.0  # seconds a claim holds in this test (normally 2 x workspace timeout + 10 s)


async def test_a_long_apply_keeps_its_claims_and_no_pass_acts_meanwhile(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(plans, "claim_seconds", lambda _policy: CLAIM)
    names = [f"ws-{i}" for i in range(6)]
    runtimes = [await runtime_factory(name, faults=Faults(install_delay=0.4)) for name in names]
    for runtime in runtimes:
        runtime.faults.restart_required = False
        await runtime.register()
    desired = fleet(*names)
    one_at_a_time = replace(policy, concurrency=1)  # six workspaces x 0.8 s: > 4 s
    plan = await plans.make_plan(desired, sessions, one_at_a_time)
    assert plan.actions == 12

    async with RuntimeDriver.for_policy(policy) as driver:
        applying = asyncio.create_task(plans.apply_plan(
            desired, sessions, driver, one_at_a_time, plan=plan, replica="apply"))
        await asyncio.sleep(CLAIM + 0.5)  # the first claims would have run out by now
        intruder = await reconcile_once(desired, sessions, driver, policy, replica="intruder")
        report = await applying

    assert not report.failed and all(has(r, SEO, NOTES) for r in runtimes)
    assert intruder.busy >= 1  # the workspaces apply had not reached yet were its
    # Every plugin was installed once, by apply: the intruding pass acted on none.
    assert [r.count("PUT") for r in runtimes] == [2] * len(runtimes)
