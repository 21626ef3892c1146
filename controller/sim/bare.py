"""The bench's heartbeat baseline: a bare JSON endpoint on the same HTTP stack as the
registry (aiohttp), doing nothing else; `python -m controller.sim.bare PORT`."""

from __future__ import annotations

import sys

from aiohttp import web


async def bare(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"status": "ok"})


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    app = web.Application()
    app.router.add_post("/registry/heartbeat", bare)
    web.run_app(app, host="127.0.0.1", port=int(args[0]), print=None, access_log=None)


if __name__ == "__main__":
    main()
