"""A simulated box for tests, benchmarks and demos only: plugins kept in a dict, and faults
to switch on (lose plugins on restart, slow or failing installs, unavailable, hanging or
garbage answers). The HTTP face and the registry client are the real agent's."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from controller.agent.runtime import AgentServer, BoxError, Installed, Prepared
from controller.domain.models import Plugin


@dataclass
class Faults:
    """Ways the simulated runtime can misbehave; all off by default. Mutable on purpose:
    a test can break or heal a running runtime."""

    lose_plugins_on_restart: bool = False
    install_delay: float = 0.0  # seconds each PUT takes
    failing_plugins: set[str] = field(default_factory=set)  # PUT answers 500 for these
    unavailable: bool = False  # every runtime API call answers 503
    hang: bool = False  # every call gets its headers and part of a body, then nothing more
    garbage: bool = False  # every call answers 200 with a body that is not JSON
    restart_required: bool = True  # a PUT that changes something asks for a restart


class MemoryBox:
    """Plugins in memory: `plugins` is the box's whole content."""

    def __init__(self, plugins: list[Plugin] | None, faults: Faults) -> None:
        self.plugins: dict[str, Plugin] = {p.name: p for p in plugins or []}
        self.faults = faults

    async def inventory(self) -> list[Plugin]:
        return sorted(self.plugins.values(), key=lambda p: p.name)

    async def prepare(self, name: str, source: str, digest: str | None) -> Prepared:
        if self.faults.install_delay:
            await asyncio.sleep(self.faults.install_delay)
        if name in self.faults.failing_plugins:
            raise BoxError(500, "Broken", f"install of {name} failed: broken plugin")
        return Prepared(name, source, digest)

    async def install(self, prepared: Prepared) -> Installed:
        name, source, digest = prepared.name, prepared.source, prepared.digest
        plugin = Plugin(name, source, digest or _digest_of(source))
        previous = self.plugins.get(name)
        changed = previous is None or previous.source != source or (
            digest is not None and previous.digest != digest)
        self.plugins[name] = plugin
        return Installed(changed, plugin.digest)

    async def remove(self, name: str) -> bool:
        return self.plugins.pop(name, None) is not None

    def restart_pending(self) -> bool:
        return False

    async def restart(self) -> str | None:
        await asyncio.sleep(0.05)
        if self.faults.lose_plugins_on_restart:
            self.plugins.clear()
        return None


class ReferenceRuntime(AgentServer):
    """A simulated runtime on a real HTTP port: the agent over a MemoryBox, with faults."""

    def __init__(self, workspace_id: str, *, faults: Faults | None = None,
                 plugins: list[Plugin] | None = None, **options: Any) -> None:
        self.faults = faults or Faults()
        self.memory = MemoryBox(plugins, self.faults)
        self._stopping = asyncio.Event()  # ends hanging answers when the runtime stops
        super().__init__(workspace_id, self.memory, **options)

    @property
    def plugins(self) -> dict[str, Plugin]:
        return self.memory.plugins

    @property
    def calls(self) -> list[Any]:
        return self.counters.calls

    @property
    def restarts(self) -> int:
        return self.counters.restarts

    @property
    def heartbeats(self) -> int:
        return self.counters.heartbeats

    def restart_required(self, changed: bool) -> bool:
        return changed and self.faults.restart_required

    def middlewares(self) -> list[Any]:
        return [*super().middlewares(), self._misbehave]

    @web.middleware
    async def _misbehave(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.faults.unavailable:
            return web.json_response({"error": "runtime unavailable"}, status=503)
        if self.faults.garbage:
            return web.Response(body=b"\x00\xff<html>not json", content_type="text/html")
        if self.faults.hang:
            hanging = web.StreamResponse(headers={"Content-Type": "application/json",
                                                  "Content-Length": "1000"})
            await hanging.prepare(request)
            await hanging.write(b'{"plugins": [')
            await self._stopping.wait()  # the caller gives up first; this ends it at stop()
            return hanging
        response: web.StreamResponse = await handler(request)
        return response

    async def stop(self) -> None:
        self._stopping.set()
        await super().stop()
        self._stopping = asyncio.Event()

    async def after_restart(self) -> None:
        """A simulated box comes back as a new one would: it registers again."""
        if self.registry_url and self._client is not None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self.register()

    def report_json(self) -> list[dict[str, str | bool]]:
        return [p.to_json() for p in sorted(self.plugins.values(), key=lambda p: p.name)]


def _digest_of(source: str) -> str:
    return "sha256:" + hashlib.sha256(source.encode()).hexdigest()[:16]
