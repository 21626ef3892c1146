"""The runtime driver: the only code that speaks HTTP to workspace runtimes
(GET/PUT/DELETE /plugins, POST /restart). Every call has a timeout; failures are values."""

from __future__ import annotations

import errno
import json
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import aiohttp.abc
from aiohttp.abc import ResolveResult

from controller.domain.models import Plugin, Policy, check_plugin_name, check_source
from controller.domain.networks import RuntimeNetworks
from controller.domain.tokens import runtime_secret_for
from controller.domain.version import user_agent


class RuntimeCallError(Exception):
    """A call to a runtime failed; the message says how, in one line."""


@dataclass(frozen=True, slots=True)
class ChangeResult:
    """What a runtime answered to an install or a removal."""

    restart_required: bool
    digest: str | None = None  # what the runtime installed, if it says
    seq: int | None = None  # the runtime's seq of this change, if it counts


def _seq(data: Any) -> int | None:
    """The optional `seq` of an answer (an integer >= 0), else None."""
    value = data.get("seq") if isinstance(data, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None


class RuntimeDriver:
    """One HTTP connection pool for all runtimes of a pass, or of a long-running loop."""

    def __init__(self, timeout: float = 10.0, caller: str | None = None,
                 networks: RuntimeNetworks | None = None, *, secret: str | None = None,
                 per_workspace: bool = False) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # `pluginctl/<version> (<caller>)`: which build calls and, if named, which replica.
        self._headers = {"User-Agent": user_agent(caller)}
        self._secret = secret or None
        self._per_workspace = per_workspace
        self._networks = networks or RuntimeNetworks()
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_policy(cls, policy: Policy, caller: str | None = None) -> RuntimeDriver:
        """The driver the loop uses: the policy's call timeout, networks and secret."""
        return cls(timeout=policy.call_timeout, caller=caller,
                   networks=policy.runtime_networks, secret=policy.runtime_secret,
                   per_workspace=policy.runtime_secret_per_workspace)

    def _authorization(self, workspace_id: str | None) -> dict[str, str]:
        if self._secret is None:
            return {}
        if not self._per_workspace:
            return {"Authorization": f"Bearer {self._secret}"}
        if workspace_id is None:
            raise RuntimeCallError("a per-workspace secret needs the workspace id")
        return {"Authorization": f"Bearer {runtime_secret_for(self._secret, workspace_id)}"}

    async def __aenter__(self) -> RuntimeDriver:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            headers=self._headers,
            # No per-host cap: many runtimes may sit behind one gateway host, and a workspace
            # never gets more than one call at a time anyway (its actions run in order).
            # Every address a name resolves to is checked at every connection, so a name
            # cannot be re-pointed at a refused address after the register was accepted.
            connector=aiohttp.TCPConnector(limit=256,
                                           resolver=_CheckedResolver(self._networks)),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, url: str, *, body: dict[str, Any] | None = None,
        ok: tuple[int, ...] = (200,), workspace_id: str | None = None,
    ) -> tuple[int, Any]:
        if self._session is None:
            raise RuntimeError("RuntimeDriver used outside `async with`")
        # An IP literal never reaches the resolver: check it here.
        reason = self._networks.host_refusal(urlsplit(url).hostname or "")
        if reason is not None:
            raise RuntimeCallError(f"{method} {_path(url)}: refused: {reason}")
        try:
            async with self._session.request(method, url, json=body,
                                             headers=self._authorization(workspace_id)
                                             ) as response:
                raw = await response.read()
                # Whatever a runtime sends (even bytes that are not UTF-8) is only data.
                text = raw.decode("utf-8", errors="replace")
                if response.status not in ok:
                    detail = _error_detail(text)
                    raise RuntimeCallError(f"{method} {_path(url)}: HTTP {response.status}"
                                           + (f": {detail}" if detail else ""))
                if not text:
                    return response.status, None
                try:
                    return response.status, json.loads(text)
                except ValueError as error:
                    raise RuntimeCallError(
                        f"{method} {_path(url)}: answer is not JSON: {text[:80]!r}"
                    ) from error
        except TimeoutError as error:
            raise RuntimeCallError(f"{method} {_path(url)}: timed out after "
                                   f"{self._timeout.total:g}s") from error
        except aiohttp.ClientError as error:
            raise RuntimeCallError(f"{method} {_path(url)}: {type(error).__name__}: "
                                   f"{error}".strip()) from error

    async def list_plugins(self, base_url: str, workspace_id: str | None = None
                           ) -> tuple[list[Plugin], int | None]:
        _, data = await self._call("GET", _join(base_url, "plugins"),
                                   workspace_id=workspace_id)
        items = data.get("plugins") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise RuntimeCallError('GET /plugins: answer has no "plugins" list')
        plugins = []
        for item in items:
            try:
                plugin = Plugin.from_json(item)
                check_plugin_name(plugin.name)
                check_source(plugin.source)
            except (KeyError, TypeError, AttributeError, ValueError) as error:
                raise RuntimeCallError(f"GET /plugins: bad entry {item!r}: {error}") from error
            plugins.append(plugin)
        return plugins, _seq(data)

    async def install(self, base_url: str, plugin: Plugin, workspace_id: str | None = None
                      ) -> ChangeResult:
        body: dict[str, Any] = {"source": plugin.source}
        if plugin.digest is not None:
            body["digest"] = plugin.digest
        _, data = await self._call("PUT", _join(base_url, "plugins", plugin.name), body=body,
                                   workspace_id=workspace_id)
        restart = data.get("restart_required", False) if isinstance(data, dict) else False
        if not isinstance(restart, bool):
            raise RuntimeCallError(f"PUT /plugins/{plugin.name}: restart_required is not a bool")
        digest = data.get("digest") if isinstance(data, dict) else None
        return ChangeResult(restart_required=restart,
                             digest=digest if isinstance(digest, str) and digest else None,
                             seq=_seq(data))

    async def remove(self, base_url: str, name: str, workspace_id: str | None = None
                     ) -> ChangeResult:
        # 404 counts as already removed: the end state is what we wanted.
        _, data = await self._call("DELETE", _join(base_url, "plugins", name),
                                   ok=(200, 204, 404), workspace_id=workspace_id)
        restart = data.get("restart_required") if isinstance(data, dict) else None
        return ChangeResult(restart_required=restart is True, seq=_seq(data))

    async def restart(self, base_url: str, workspace_id: str | None = None) -> None:
        await self._call("POST", _join(base_url, "restart"), ok=(200, 202, 204),
                         workspace_id=workspace_id)


def _join(base_url: str, *parts: str) -> str:
    return base_url.rstrip("/") + "/" + "/".join(quote(part, safe="") for part in parts)


def _path(url: str) -> str:
    after_scheme = url.split("://", 1)[-1]
    return "/" + after_scheme.split("/", 1)[1] if "/" in after_scheme else "/"


def _error_detail(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:200]
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])[:200]
    return text.strip()[:200]


class _CheckedResolver(aiohttp.abc.AbstractResolver):
    """Resolves like aiohttp does, then drops the addresses the networks policy refuses; a
    name left with none fails the call with the reason."""

    def __init__(self, networks: RuntimeNetworks) -> None:
        self._networks = networks
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        reasons = []
        allowed = []
        for entry in await self._inner.resolve(host, port, family):
            reason = self._networks.refusal(entry["host"])
            if reason is None:
                allowed.append(entry)
            else:
                reasons.append(reason)
        if not allowed:
            raise OSError(errno.EACCES,
                          f"refused: {host}: " + "; ".join(reasons or ["no address"]))
        return allowed

    async def close(self) -> None:
        await self._inner.close()
