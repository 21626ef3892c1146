"""The fault-injection suite. Each case breaks one real part — a runtime, the database, the
controller process, the registry, the delivery of edges, the clock — and asserts that the
fleet converges afterwards, with nothing lost and nothing done twice that should not be.
(The Kubernetes API server going away is in test_kubernetes; a replica killed among others
in test_replicas.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from freezegun import freeze_time

from controller.agent import ReferenceRuntime
from controller.models import Policy, utcnow
from controller.status import PluginState
from controller.status import build as build_status
from controller.store import Sessions, queries, transaction

from .conftest import NOTES, SEO, RuntimeFactory, fleet
from .test_loop import has, one_pass


async def _timeout(runtime: ReferenceRuntime) -> None:
    runtime.faults.install_delay = 3.0  # the policy below allows 0.5 s per call


async def _server_error(runtime: ReferenceRuntime) -> None:
    runtime.faults.unavailable = True


async def _refused(runtime: ReferenceRuntime) -> None:
    await runtime.stop()  # registered, then gone: connection refused


async def _hang(runtime: ReferenceRuntime) -> None:
    runtime.faults.hang = True


async def _garbage(runtime: ReferenceRuntime) -> None:
    runtime.faults.garbage = True


async def _heal(runtime: ReferenceRuntime) -> None:
    runtime.faults.install_delay = 0.0
    runtime.faults.unavailable = runtime.faults.hang = runtime.faults.garbage = False
    if not runtime.running:
        await runtime.start()  # comes back (on a new port, as a rescheduled pod would)
        await runtime.register()


Fault = Callable[[ReferenceRuntime], Awaitable[None]]


@pytest.mark.parametrize(("fault", "message"), [
    (_timeout, "timed out after 0.5s"),
    (_server_error, "HTTP 503: runtime unavailable"),
    (_refused, "ClientConnectorError"),
    (_hang, "timed out after 0.5s"),
    (_garbage, "answer is not JSON"),
], ids=["timeout", "5xx", "refused", "hang-mid-response", "garbage"])
async def test_a_faulty_runtime_backs_off_alone_and_converges_once_healed(
    sessions: Sessions, runtime_factory: RuntimeFactory, fault: Fault, message: str
) -> None:
    """Ten simulated minutes of passes every 15 s against a broken runtime: it is tried a
    bounded number of times (backoff, not every pass), its error is in its status, the
    healthy workspace beside it converges undisturbed, and once healed it converges too."""
    policy = Policy(call_timeout=0.5, offline_after=timedelta(days=1))
    broken = await runtime_factory("broken")
    healthy = await runtime_factory("healthy")
    desired = fleet("broken", "healthy")
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        await broken.register()
        await healthy.register()
        await fault(broken)
        for _ in range(40):
            await one_pass(desired, sessions, policy)
            clock.tick(15)
        now = utcnow()
        with transaction(sessions) as session:
            observed = queries.load_observed(session)["broken"]
        state = build_status(desired.workspaces["broken"], observed, now, policy)
        seo = next(p for p in state.plugins if p.name == "seo-all")
        assert seo.state is PluginState.FAILED and message in seo.message, seo
        # 5 s doubling to the cap, jitter up to -20 %: 7 to 9 tries in ten minutes, not 40.
        assert 5 <= seo.attempts <= 10, seo.attempts
        last_try = observed.attempts["seo-all"].last_attempt_at
        assert seo.next_retry_at is not None and seo.next_retry_at > last_try
        assert not state.in_sync
        assert has(healthy, SEO, NOTES) and healthy.count("PUT") == 2

        await _heal(broken)
        clock.tick(policy.backoff_cap.total_seconds())  # every retry is due by now
        healed = await one_pass(desired, sessions, policy)
    assert healed.in_sync, healed.summary()
    assert has(broken, SEO, NOTES)
    with transaction(sessions) as session:
        assert queries.load_observed(session)["broken"].attempts == {}
