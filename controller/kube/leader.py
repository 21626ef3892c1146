"""Leader election on a coordination.k8s.io/v1 Lease, as client-go does it: the leader
renews every `retry` seconds; a candidate takes over once it has seen the lease unchanged for
`duration` seconds (judged by its own monotonic clock, so clock skew between nodes does not
matter); a leader that cannot renew within `renew_deadline` steps down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from controller.kube.client import KubeClient, KubeError

log = logging.getLogger("pluginctl.leader")


def default_identity() -> str:
    """This replica's name, unique per process: the Lease's holder, the Events' reporter."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str = "pluginctl-leader"
    duration: float = 15.0
    renew_deadline: float = 10.0
    retry: float = 2.0


def _micro_time(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, client: KubeClient, config: LeaseConfig, identity: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.config = config
        self.identity = identity
        self.is_leader = asyncio.Event()
        self.lost = asyncio.Event()  # set whenever leadership ends
        self.lost.set()
        self._clock = clock
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0

    def _body(self, lease: dict[str, Any] | None, acquire: bool) -> dict[str, Any]:
        now = _micro_time(datetime.now(UTC))
        spec = dict((lease or {}).get("spec") or {})
        if acquire:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
                1 if lease else 0)
        spec.update({"holderIdentity": self.identity, "renewTime": now,
                     "leaseDurationSeconds": int(self.config.duration)})
        metadata: dict[str, Any] = {"name": self.config.name,
                                    "namespace": self.config.namespace}
        if lease is not None:
            metadata["resourceVersion"] = lease["metadata"]["resourceVersion"]
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": metadata, "spec": spec}

    def _try(self) -> bool:
        """One attempt to acquire or renew. True when we hold the lease afterwards."""
        lease = self.client.read_lease(self.config.namespace, self.config.name)
        if lease is None:
            return self.client.write_lease(self.config.namespace, self._body(None, True),
                                           create=True)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        record = (holder, spec.get("renewTime"), spec.get("acquireTime"))
        now = self._clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        if holder == self.identity:
            return self.client.write_lease(self.config.namespace, self._body(lease, False),
                                           create=False)
        expired = not holder or now - self._observed_at > self.config.duration
        if not expired:
            return False
        return self.client.write_lease(self.config.namespace, self._body(lease, True),
                                       create=False)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    # A call that hangs (an API server gone silent) must not keep a leader
                    # leading: past the renew deadline it counts as failed.
                    held = await asyncio.wait_for(self.client.call(self._try),
                                                  self.config.renew_deadline)
                except (KubeError, TimeoutError) as error:
                    log.warning("lease %s/%s: %s", self.config.namespace, self.config.name,
                                error or "no answer within the renew deadline")
                    held = False
                    if self.is_leader.is_set() and \
                            self._clock() - self._renewed_at < self.config.renew_deadline:
                        held = True  # keep leading until the renew deadline passes
                if held and not self.is_leader.is_set():
                    log.info("became the leader (%s)", self.identity)
                    self.lost.clear()
                    self.is_leader.set()
                elif not held and self.is_leader.is_set():
                    log.warning("lost the leadership (%s)", self.identity)
                    self.is_leader.clear()
                    self.lost.set()
                if held:
                    self._renewed_at = self._clock()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.retry)
        finally:
            if self.is_leader.is_set():
                self.is_leader.clear()
                self.lost.set()
                await self.client.call(self._release)

    def _release(self) -> None:
        """Step down on a clean exit so that a standby takes over at once."""
        try:
            lease = self.client.read_lease(self.config.namespace, self.config.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                body = self._body(lease, False)
                body["spec"]["holderIdentity"] = None
                body["spec"]["leaseDurationSeconds"] = 1
                self.client.write_lease(self.config.namespace, body, create=False)
        except KubeError as error:
            log.warning("could not release the lease: %s", error)
