"""The bench's memory measure, in a child process of its own so that its peak RSS is the
controller's alone: the whole controller (registry with its token cache, and the loop) over
N seeded workspaces through a cold and a steady pass. `python -m controller.sim.memory URL N`
prints the figures as one JSON line."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from datetime import timedelta
from typing import Any

from controller.domain.desired import Desired
from controller.domain.models import DesiredWorkspace, Plugin, Policy
from controller.engine.queue import Trigger
from controller.engine.report import PassReport
from controller.engine.service import serve
from controller.store import make_engine, make_sessions

PLUGINS = [Plugin(f"plugin-{i}", f"gitea://org/skills/plugin-{i}#v1") for i in range(5)]


def desired_fleet(ids: list[str], plugins: list[Plugin]) -> Desired:
    by_name = {p.name: p for p in plugins}
    return Desired({i: DesiredWorkspace(i, f"default/{i}", None, by_name) for i in ids}, (), ())


def proc_status_kb(field: str, pid: int | str = "self") -> int:
    """A kB figure of /proc/PID/status (VmRSS, VmHWM); for ourselves, ru_maxrss without it."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if pid == "self" else 0


class Passes:
    """The loop's pass reports, until the cold first pass and the steady one after it."""

    def __init__(self) -> None:
        self.reports: list[PassReport] = []
        self.stop = asyncio.Event()

    def first_and_steady(self) -> tuple[PassReport, PassReport] | None:
        if not self.reports:
            return None
        first = min(self.reports, key=lambda p: p.started_at)
        if first.synced or first.busy:  # not the cold pass: that one is still running
            return None
        later = [p for p in self.reports if p.started_at > first.finished_at]
        return (first, later[0]) if later else None

    def on_pass(self, report: PassReport, _trigger: Trigger) -> None:
        self.reports.append(report)
        if self.first_and_steady() is not None:
            self.stop.set()


async def measure(url: str, workspaces: int) -> dict[str, Any]:
    # The peak survives exec (it would be the parent's); reset it, then measure.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    before = proc_status_kb("VmHWM")
    engine = make_engine(url)
    sessions = make_sessions(engine)
    desired = desired_fleet([f"ws-{i:07d}" for i in range(workspaces)], PLUGINS)
    passes = Passes()
    # Full passes are due every second but wait for the cold first pass to finish planning;
    # the one that starts after it finished is the steady no-op pass.
    # (No heartbeats here: the fleet is kept online by a long offline-after.)
    policy = Policy(offline_after=timedelta(hours=1))
    await serve(lambda: desired, sessions, policy, host="127.0.0.1", port=0, interval=1.0,
                stop=passes.stop, on_pass=passes.on_pass)
    after = proc_status_kb("VmHWM")
    engine.dispose()
    found = passes.first_and_steady()
    if found is None:
        raise RuntimeError("the loop stopped before a cold and a steady pass")
    first, steady = found
    return {"baseline_rss_mb": round(before / 1024, 1), "peak_rss_mb": round(after / 1024, 1),
            "online": first.online,
            "first_pass_s": round((first.finished_at - first.started_at).total_seconds(), 2),
            "steady_pass_s": round((steady.finished_at - steady.started_at).total_seconds(), 2),
            "steady_pass_synced": steady.synced}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(asyncio.run(measure(args[0], int(args[1])))))


if __name__ == "__main__":
    main()
