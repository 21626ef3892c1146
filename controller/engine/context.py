"""The pass context: what every step of one pass (triage, plan, claim, act, record) reads,
built once when the pass starts, so that the steps take it instead of long parameter lists.
`pluginctl apply` builds one too, to act through the same steps."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from controller.domain.desired import Desired
from controller.domain.models import DesiredWorkspace, Policy
from controller.engine.queue import Trigger
from controller.engine.report import WorkspaceResult
from controller.runtime.driver import RuntimeDriver
from controller.store import Sessions

DEFAULT_REPLICA = f"{socket.gethostname()}-{os.getpid()}"

Progress = Callable[[int, int], None]  # (workspaces done, workspaces in the pass)
#: Told the results of workspaces a pass has finished acting on, as they finish.
Acted = Callable[[tuple[WorkspaceResult, ...]], None]


class Tally:
    """How far a pass has got, told to a progress bar as workspaces are done."""

    def __init__(self, progress: Progress | None = None, *, total: int = 0, done: int = 0
                 ) -> None:
        self._progress = progress
        self.total = total
        self.done = done

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._progress is not None:
            self._progress(self.done, self.total)


@dataclass(frozen=True, kw_only=True)
class PassContext:
    desired: Desired
    sessions: Sessions
    driver: RuntimeDriver
    policy: Policy
    now: datetime  # the instant the pass plans for (backoff, restart windows)
    limit: asyncio.Semaphore  # how many workspaces this process acts on at once
    rand: Callable[[], float] = random.random  # backoff jitter
    replica: str = DEFAULT_REPLICA  # whose claims these are, among replicas sharing a store
    dry_run: bool = False
    trigger: Trigger = Trigger.MANUAL  # what started the pass
    triggers: Mapping[str, Trigger] = field(default_factory=dict)  # what brought each one in
    tally: Tally = field(default_factory=Tally)
    acted: Acted | None = None

    def wanted(self, workspace_id: str) -> DesiredWorkspace:
        return self.desired.workspaces[workspace_id]

    def trigger_of(self, workspace_id: str) -> Trigger:
        """What brought this workspace into the pass (the pass's trigger if nothing more)."""
        return self.triggers.get(workspace_id, self.trigger)
