"""Real git repositories for the agent's tests: bare repositories with tagged versions,
served from `file://` roots and over smart HTTP by `git http-backend` (a CGI program, run
here per request behind a small aiohttp server on loopback)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

_AUTHOR = ["-c", "user.name=pluginctl tests", "-c", "user.email=tests@pluginctl.invalid",
           "-c", "init.defaultBranch=main", "-c", "tag.gpgSign=false",
           "-c", "commit.gpgSign=false"]


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *_AUTHOR, *args], cwd=cwd, check=True, text=True,
                          capture_output=True).stdout.strip()


class Repo:
    """A working repository and its bare twin at ROOT/OWNER/REPO.git, the layout the agent
    fetches `scheme://OWNER/REPO/SUBPATH#TAG` from."""

    def __init__(self, root: Path, owner: str, name: str) -> None:
        self.work = root.parent / f"{root.name}-work" / owner / name
        self.bare = root / owner / f"{name}.git"
        self.work.mkdir(parents=True)
        git("init", "-q", str(self.work))
        git("init", "-q", "--bare", str(self.bare))

    def commit(self, files: Mapping[str, str | bytes], tag: str | None = None,
               symlinks: Mapping[str, str] | None = None, executable: tuple[str, ...] = ()
               ) -> str:
        """Write these files (relative paths), commit everything, tag, push; the commit id."""
        for relative, content in files.items():
            path = self.work / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
            if relative in executable:
                path.chmod(0o755)
        for relative, target in (symlinks or {}).items():
            path = self.work / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", f"version {tag or 'untagged'}", cwd=self.work)
        if tag is not None:
            git("tag", "-a", tag, "-m", tag, cwd=self.work)
        git("push", "-q", "--tags", str(self.bare), "HEAD:refs/heads/main", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)


@asynccontextmanager
async def http_server(root: Path, *, hang: bool = False, require: str | None = None
                      ) -> AsyncIterator[str]:
    """Serve every repository under `root` over smart HTTP (`git http-backend`); with
    `hang`, accept requests and never answer; with `require`, answer 401 to requests without
    that Authorization header (a private repository). Yields the root URL."""

    stopping = asyncio.Event()

    async def backend(request: web.Request) -> web.StreamResponse:
        if hang:
            await stopping.wait()
            raise web.HTTPServiceUnavailable()
        if require is not None and request.headers.get("Authorization") != require:
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="git"'})
        body = await request.read()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": request.path,
            "QUERY_STRING": request.query_string,
            "REQUEST_METHOD": request.method,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": request.headers.get("Content-Encoding", ""),
        }
        process = await asyncio.create_subprocess_exec(
            "git", "http-backend", env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await process.communicate(body)
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, {}
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers[key.strip()] = value.strip()
        return web.Response(status=status, body=payload, headers=headers)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", backend)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stopping.set()
        await runner.cleanup()
