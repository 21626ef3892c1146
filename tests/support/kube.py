"""The end-to-end suite's Kubernetes control plane (`controller.sim.control_plane`: etcd and
kube-apiserver on loopback, as envtest does, shared with `pluginctl bench --kubernetes`), and a
proxy in front of it that can lose watch events or the API server itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml

from controller.sim.control_plane import (
    ADMIN_TOKEN,
    ControlPlane,
    KubeUnavailable,
    binaries,
    install_crds,
    kubeconfig_for,
    start,
)

__all__ = ["ADMIN_TOKEN", "ControlPlane", "KubeProxy", "KubeUnavailable", "binaries",
           "install_crds", "start"]


class KubeProxy:
    """A plain-HTTP proxy in front of the API server, run in the test's event loop, through
    which an operator can be made to lose a share of its watch events, or lose the API
    server altogether (requests hang, as behind a dead network path)."""

    def __init__(self, plane: ControlPlane, loss: float = 0.0, seed: int = 7) -> None:
        import random

        self.plane = plane
        self.loss = loss
        self.rand = random.Random(seed)
        self.dropped: list[str] = []  # "TYPE kind/name" of every watch event dropped
        self.always_drop: set[str] = set()  # names whose every watch event is dropped
        self.reachable = asyncio.Event()
        self.reachable.set()
        self.url = ""
        self._runner: Any = None
        self._client: Any = None

    async def start(self) -> KubeProxy:
        import aiohttp
        from aiohttp import web

        from controller.registry.serving import start_site

        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=False), skip_auto_headers=("Accept", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        self.url = f"http://127.0.0.1:{await start_site(self._runner, '127.0.0.1', 0)}"
        return self

    async def stop(self) -> None:
        self.reachable.set()
        await self._client.close()
        await self._runner.cleanup()

    def kubeconfig(self, name: str) -> Path:
        path = self.plane.directory / f"kubeconfig-proxy-{name}"
        path.write_text(yaml.safe_dump(kubeconfig_for(self.url, ADMIN_TOKEN, "admin")))
        return path

    async def _forward(self, request: Any) -> Any:
        import json

        from aiohttp import web

        await self.reachable.wait()  # unreachable: the request hangs, nothing comes back
        hop = ("host", "content-length", "transfer-encoding", "connection", "accept-encoding")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in hop]
        async with self._client.request(request.method, self.plane.url + request.path_qs,
                                        data=await request.read(),
                                        headers=headers) as upstream:
            watching = request.query.get("watch") in ("true", "1")
            if not watching:
                return web.Response(body=await upstream.read(), status=upstream.status,
                                    content_type=upstream.content_type)
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            async for line in upstream.content:
                await self.reachable.wait()  # a stream in flight stalls too
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {}
                kind = event.get("type")
                meta = (event.get("object") or {}).get("metadata") or {}
                if kind in ("ADDED", "MODIFIED", "DELETED") and (
                        meta.get("name") in self.always_drop or self.rand.random() < self.loss):
                    self.dropped.append(f"{kind} {request.path.rsplit('/', 1)[-1]}/"
                                        f"{meta.get('name')}")
                    continue
                await response.write(line)
            return response


def kubeconfig_in_namespace(plane: ControlPlane, namespace: str, path: Path) -> Path:
    """A copy of the admin kubeconfig whose context works in `namespace`, as `kubectl config
    set-context --current --namespace` leaves a user's."""
    path.write_text(plane.kubeconfig.read_text())
    plane.kubectl("config", "set-context", "--current", f"--namespace={namespace}",
                  kubeconfig=path)
    return path
