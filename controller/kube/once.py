"""`pluginctl reconcile --once --kubernetes`: list the cluster's objects, run one pass on
them, write what came of it. Without the operator's watches, so without kopf."""

from __future__ import annotations

from collections.abc import Callable

from controller.domain.models import Policy
from controller.engine.passes import reconcile_once
from controller.engine.report import PassReport
from controller.kube.client import KubeClient
from controller.kube.leader import default_identity
from controller.kube.status_writer import StatusWriter
from controller.kube.view import ClusterView
from controller.runtime.driver import RuntimeDriver
from controller.store import Sessions


async def reconcile_cluster_once(kube: KubeClient, sessions: Sessions, policy: Policy,
                                 driver: RuntimeDriver, *, dry_run: bool,
                                 progress: Callable[[int, int], None] | None = None,
                                 force: bool = False) -> PassReport:
    """`pluginctl reconcile --once` against the cluster: list, pass, mirror (unless dry)."""
    view = await kube.call(ClusterView.listed, kube)
    desired = view.desired()
    report = await reconcile_once(desired, sessions, driver, policy, dry_run=dry_run,
                                  progress=progress, force=force)
    if not dry_run:
        writer = StatusWriter(kube, sessions, policy, default_identity())
        await writer.apply(view, desired, report)
        await writer.flush()
    return report
