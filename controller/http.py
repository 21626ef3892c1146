"""Small helpers for the aiohttp servers pluginctl runs (the registry, the reference runtime)."""

from __future__ import annotations

import socket

from aiohttp import web


async def start_site(runner: web.AppRunner, host: str, port: int) -> int:
    """Listen on host:port (port 0: any free port) and return the port actually bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    await web.SockSite(runner, listener).start()
    return int(listener.getsockname()[1])
