"""Fixtures the end-to-end modules share: one Kubernetes control plane per session (the
Kubernetes tests run on one xdist worker, so one kube-apiserver and etcd serve them all)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from controller.agent.simulated import ReferenceRuntime
from tests.support import kube


@pytest.fixture(scope="session")
def plane() -> Iterator[kube.ControlPlane]:
    try:
        control_plane = kube.start()
    except kube.KubeUnavailable as error:
        pytest.fail(f"no Kubernetes control plane for the end-to-end suite: {error}",
                    pytrace=False)
    try:
        try:
            kube.install_crds(control_plane)
        except kube.KubeUnavailable as error:
            pytest.fail(str(error), pytrace=False)
        yield control_plane
    finally:
        control_plane.stop()


@pytest.fixture
async def runtimes() -> AsyncIterator[list[ReferenceRuntime]]:
    """Reference runtimes a test starts; stopped after it."""
    started: list[ReferenceRuntime] = []
    yield started
    for runtime in started:
        await runtime.stop()
