"""The operator's mirrors: one at a time, in order, and passes that end meanwhile merged into
the next one, so that two writes to one object never race and the newest state wins."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime

import pytest

from controller.domain.desired import Desired
from controller.domain.rollout import RolloutPhase
from controller.engine.queue import Trigger
from controller.engine.report import PassReport, WorkspaceResult
from controller.kube.operator import Mirrors, merged
from controller.kube.view import ClusterView
from tests.unit.test_mirror import summary

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def report(*ids: str, scope: frozenset[str] | None = None) -> PassReport:
    return PassReport(started_at=NOW, finished_at=NOW, dry_run=False, scope=scope,
                      results=tuple(WorkspaceResult(workspace_id=i, plans=(),
                                                    trigger=Trigger.REGISTRY) for i in ids))


def view(tag: str) -> ClusterView:
    return ClusterView([{"metadata": {"name": tag}}], [], [])


class Sink:
    """Records each mirror, and holds the first one until released."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, PassReport | None]] = []
        self.writing = 0
        self.overlapped = False
        self.release = asyncio.Event()

    async def apply(self, view: ClusterView, desired: Desired,
                    report: PassReport | None) -> None:
        self.writing += 1
        self.overlapped |= self.writing > 1
        await self.release.wait()
        self.applied.append((view.workspaces[0]["metadata"]["name"], report))
        self.writing -= 1


def test_merged_keeps_every_result_and_joins_scopes() -> None:
    one = merged([report("a", scope=frozenset({"a"})), report("b", scope=frozenset({"b"}))])
    assert [r.workspace_id for r in one.results] == ["a", "b"]
    assert one.scope == frozenset({"a", "b"})
    assert merged([report("a", scope=frozenset({"a"})), report("b")]).scope is None


async def test_mirrors_run_one_at_a_time_and_merge_what_ended_meanwhile() -> None:
    sink = Sink()
    mirrors = Mirrors(sink)
    running = asyncio.create_task(mirrors.run())
    empty = Desired({}, (), ())
    mirrors.add(view("v1"), empty, report("a", scope=frozenset({"a"})))
    await asyncio.sleep(0)  # the first mirror starts and waits
    for tag, workspace in (("v2", "b"), ("v3", "c")):
        mirrors.add(view(tag), empty, report(workspace, scope=frozenset({workspace})))
    sink.release.set()
    mirrors.close()
    await asyncio.wait_for(running, 5)
    assert not sink.overlapped
    assert [tag for tag, _ in sink.applied] == ["v1", "v3"]  # the newest view wins
    second = sink.applied[1][1]
    assert second is not None
    assert [r.workspace_id for r in second.results] == ["b", "c"]
    assert second.scope == frozenset({"b", "c"})
    assert mirrors.newest is None  # a view of every object is not kept once mirrored


def test_merged_keeps_the_rollouts_the_newest_full_pass_judged() -> None:
    judged = (summary(RolloutPhase.HALTED),)
    full = dataclasses.replace(report("a"), rollouts=judged)
    hinted = report("b", scope=frozenset({"b"}))
    assert merged([full, hinted]).rollouts == judged
    assert merged([hinted, full]).rollouts == judged


def test_merged_says_each_result_once_though_an_early_report_carried_it() -> None:
    """A pass's early reports and its own report, merged into one mirror: each workspace's
    result once (its Events said once), the early one kept."""
    first = PassReport.early(report("a").results, started_at=NOW, held_back={})
    own = dataclasses.replace(report("a", "b"), streamed=frozenset({"a"}))
    assert own.unsaid == (own.results[1],)
    one = merged([first, own])
    assert [r.workspace_id for r in one.results] == ["a", "b"]
    assert one.results[0] is first.results[0]
    assert one.streamed == frozenset() and one.scope is None
    assert first.scope == frozenset({"a"})


async def test_events_wait_until_status_writes_have_rested(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued Events go out only once no status patch waits and none has gone out for
    EVENTS_SETTLE seconds: a rollout's early mirrors come one after another, and every
    Event written between them delays the next Ready."""
    from controller.domain.models import Policy
    from controller.kube import status_writer
    from controller.kube.status_writer import StatusWriter

    monkeypatch.setattr(status_writer, "EVENTS_SETTLE", 0.2)
    writer = StatusWriter(kube=None, sessions=None, policy=Policy(),  # type: ignore[arg-type]
                          identity="test")
    loop = asyncio.get_running_loop()
    writer.patched_at = loop.time()
    settled = asyncio.create_task(writer._settled())
    await asyncio.sleep(0.05)
    assert not settled.done()  # patched 0.05 s ago
    await asyncio.wait_for(settled, 5)
    assert loop.time() - writer.patched_at >= 0.2
    writer.quiet.clear()  # a mirror's patches are going out
    writer.patched_at = float("-inf")
    settled = asyncio.create_task(writer._settled())
    await asyncio.sleep(0.05)
    assert not settled.done()
    writer.patched_at = loop.time()
    writer.quiet.set()
    await asyncio.wait_for(settled, 5)
    assert loop.time() - writer.patched_at >= 0.2
