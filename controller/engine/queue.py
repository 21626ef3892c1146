"""The work queue, where the loop's passes begin: the workspaces the registry and the
operator's watch asked it to look at sooner (each with the reason it was hinted for), the
workspaces a pass of this process holds right now, and how many it acts on at once. Every
pass of one process shares one queue, as controller-runtime's controllers share a workqueue.
Correctness never depends on hints: the periodic full pass covers every workspace anyway."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType

from controller.domain.planner import Held


class Trigger(enum.StrEnum):
    """What started a pass, or an action within one (in logs, metrics and Events)."""

    PERIODIC = "periodic"  # the full pass every interval
    HINT = "hint"  # a pass over hinted workspaces only
    HINT_STORM = "hint-storm"  # too many hints at once: a full pass instead
    MANUAL = "manual"  # a person asked: `reconcile --once`, `apply`, a requestedAt annotation
    REGISTRY = "registry"  # a register, or a heartbeat whose report changed
    TEMPLATE_CHANGE = "template-change"  # the desired state changed (template or Workspace)
    RETRY = "retry"  # the action failed before: its backoff came due


#: A hinted workspace keeps the weightiest reason it was hinted for.
_HINT_RANK = {Trigger.REGISTRY: 0, Trigger.TEMPLATE_CHANGE: 1, Trigger.MANUAL: 2}
MAX_HINTED = 1000  # more hinted workspaces than this at once: run a full pass instead


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What one pass is asked to look at, and why: controller-runtime's reconcile.Request,
    for a whole pass. It names workspaces; it never carries the event that hinted them."""

    trigger: Trigger = Trigger.MANUAL  # what started the pass
    hinted: Mapping[str, Trigger] = field(default_factory=dict)  # why each hint came
    only: frozenset[str] | None = None  # the workspaces this pass is about; None: all
    #: A blast-radius guard an earlier full pass tripped: while it stands, a small pass with
    #: actions holds too, so that a held mass change never trickles out one hint at a time.
    hold: Held | None = None


class WorkQueue:
    """Hints in, requests out; and the set of workspaces this process's passes hold, so
    that passes may overlap (a slow runtime never delays the next pass) without two of them
    ever planning or acting on one workspace."""

    def __init__(self) -> None:
        self._hints: dict[str, Trigger] = {}
        self.hinted = asyncio.Event()  # set while hints wait to be taken
        self._held: set[str] = set()
        self._limit: asyncio.Semaphore | None = None

    def __call__(self, workspace_id: str, reason: Trigger = Trigger.REGISTRY) -> None:
        """Hint: look at this workspace sooner (the registry's and the watch's entry)."""
        known = self._hints.get(workspace_id)
        if known is None or _HINT_RANK[reason] > _HINT_RANK[known]:
            self._hints[workspace_id] = reason
        self.hinted.set()

    def take(self) -> dict[str, Trigger]:
        """The hinted workspaces, each with the reason it was hinted for; the queue forgets
        them."""
        hints, self._hints = self._hints, {}
        self.hinted.clear()
        return hints

    def next_request(self, *, full: bool) -> Request:
        """The next pass: a full periodic one (which still says why hinted workspaces were
        hinted), or one over the hinted workspaces alone; a storm of hints (a fleet
        reconnecting) becomes one full pass, which is cheaper than a huge small one."""
        hinted = self.take()
        if full:
            return Request(trigger=Trigger.PERIODIC, hinted=hinted)
        if len(hinted) > MAX_HINTED:
            return Request(trigger=Trigger.HINT_STORM, hinted=hinted)
        return Request(trigger=Trigger.HINT, hinted=hinted, only=frozenset(hinted))

    def __contains__(self, workspace_id: object) -> bool:
        """Whether a pass of this process holds this workspace (planning or acting on it)."""
        return workspace_id in self._held

    def reserve(self, workspace_ids: Iterable[str]) -> Reservation:
        """Hold these workspaces for one pass until it releases them; a pass that starts
        meanwhile leaves them alone. The caller checks they are free (`in`) first."""
        return Reservation(self._held, workspace_ids)

    def limit(self, concurrency: int) -> asyncio.Semaphore:
        """The one bound on how many workspaces this process acts on at once, shared by
        overlapping passes; sized from the policy of the first pass that asks."""
        if self._limit is None:
            self._limit = asyncio.Semaphore(max(1, concurrency))
        return self._limit


class Reservation:
    """The workspaces one pass holds in its queue: each is released as soon as the pass is
    done with it (nothing to do, or acted on), and whatever is left when the pass ends."""

    def __init__(self, held: set[str], workspace_ids: Iterable[str]) -> None:
        self._held = held
        self._ids = set(workspace_ids)
        held.update(self._ids)

    def release(self, workspace_ids: Iterable[str]) -> None:
        done = self._ids.intersection(workspace_ids)
        self._ids -= done
        self._held -= done

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release(list(self._ids))
