"""The real box: plugins fetched from their sources (`sources`) into the plugins directory
(`disk`), digests checked, and restarts run through the command the box's operator gave."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass

from controller.agent.disk import DiskError, PluginsDir
from controller.agent.runtime import BoxError, Installed, Prepared
from controller.agent.sources import Failure, Fetched, FetchError, Sources
from controller.agent.tree import is_digest
from controller.domain.models import Plugin

log = logging.getLogger("pluginctl.agent")

#: The runtime API's answer to each way a fetch can fail.
_STATUS = {
    Failure.BAD_SOURCE: 422,
    Failure.NOT_FOUND: 422,
    Failure.REFUSED: 422,
    Failure.TIMEOUT: 504,
    Failure.FETCH_FAILED: 502,
}


#: Never handed to the restart command.
_SECRETS = frozenset({"PLUGINCTL_TOKEN", "PLUGINCTL_TOKEN_FILE",
                      "PLUGINCTL_CONTROLLER_SECRET_FILE"})


@dataclass(frozen=True)
class RestartCommand:
    """`--restart-command`, split like a shell would, run without one."""

    argv: tuple[str, ...]
    timeout: float = 60.0


class DiskBox:
    def __init__(self, plugins: PluginsDir, sources: Sources, workspace_id: str,
                 restart: RestartCommand | None = None) -> None:
        self.plugins = plugins
        self.sources = sources
        self.workspace_id = workspace_id
        self.restart_command = restart
        self._restarting = asyncio.Lock()

    async def inventory(self) -> list[Plugin]:
        return await asyncio.to_thread(self.plugins.inventory)

    async def prepare(self, name: str, source: str, digest: str | None) -> Prepared:
        """Fetch and check (nothing on the box changes): the digest declared, if any, must be
        the fetched tree's."""
        if digest is not None and not is_digest(digest):
            raise BoxError(422, "BadDigest", f"digest {digest!r} is not sha256:<64 hex> "
                                             "(see `pluginctl digest`)")
        problem = await asyncio.to_thread(self.plugins.owner_problem, name)
        if problem is not None:
            raise BoxError(409, "NotOwned", problem)
        try:
            fetched = await self.sources.fetch(source)
        except FetchError as error:
            raise BoxError(_STATUS[error.reason], error.reason.value, str(error)) from error
        if digest is not None and digest != fetched.digest:
            raise BoxError(422, "DigestMismatch",
                           f"{source} has digest {fetched.digest}, but {digest} was declared; "
                           "nothing was changed")
        return Prepared(name, source, fetched.digest, fetched)

    async def install(self, prepared: Prepared) -> Installed:
        name, source, fetched = prepared.name, prepared.source, prepared.payload
        if not isinstance(fetched, Fetched):
            raise BoxError(500, "NotPrepared", f"{name}: not prepared by this box")
        try:
            changed = await asyncio.to_thread(self.plugins.install, name, source, fetched)
        except DiskError as error:
            raise BoxError(409 if error.conflict else 422,
                           "NotOwned" if error.conflict else "Refused", str(error)) from error
        except OSError as error:
            raise BoxError(500, "DiskError", f"cannot install {name}: {error}") from error
        return Installed(changed, fetched.digest)

    async def remove(self, name: str) -> bool:
        try:
            removed = await asyncio.to_thread(self.plugins.remove, name)
        except DiskError as error:
            raise BoxError(409, "NotOwned", str(error)) from error
        except OSError as error:
            raise BoxError(500, "DiskError", f"cannot remove {name}: {error}") from error
        return removed

    def restart_pending(self) -> bool:
        return self.plugins.restart_pending()

    async def restart(self) -> str | None:
        """One restart at a time; it pays for the changes made before it started."""
        async with self._restarting:
            await asyncio.to_thread(self.plugins.restart_starting)
            failure = await self._run_restart()
            await asyncio.to_thread(self.plugins.restart_finished, failure is None)
            return failure

    async def _run_restart(self) -> str | None:
        command = self.restart_command
        if command is None:
            log.info("%s: restart asked for; no --restart-command, so nothing to do",
                     self.workspace_id)
            return None
        log.info("%s: restarting: %s", self.workspace_id, " ".join(command.argv))
        try:
            process = await asyncio.create_subprocess_exec(
                *command.argv,
                env={**{k: v for k, v in os.environ.items() if k not in _SECRETS},
                     "PLUGINCTL_WORKSPACE_ID": self.workspace_id},
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as error:
            return f"restart command {command.argv[0]!r} could not start: {error.strerror}"
        try:
            output, _ = await asyncio.wait_for(process.communicate(), command.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            return f"restart command timed out after {command.timeout:g}s (--restart-timeout)"
        if process.returncode != 0:
            tail = " ".join(output.decode("utf-8", "replace").split())[-300:]
            return (f"restart command exited with {process.returncode}"
                    + (f": {tail}" if tail else ""))
        return None
