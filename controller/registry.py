"""The registry API: runtimes register and heartbeat here. It only records facts (status,
URL, last seen, reported plugins) and may hint the loop to look sooner; it never calls a
runtime."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import pydantic
from aiohttp import web

from controller import api, tokens
from controller.models import utcnow
from controller.store import DatabaseError, Sessions, queries, transaction

log = logging.getLogger("pluginctl.registry")

MAX_BODY_BYTES = 256 * 1024
Hint = Callable[[str], None]

SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions", Sessions)
HINT: web.AppKey[Hint] = web.AppKey("hint", Callable)  # type: ignore[arg-type]


TOKEN_CACHE_SECONDS = 5.0  # a revoked token stops working within this
FLUSH_SECONDS = 1.0  # a mere "still alive" reaches the store within this


class Ingest:
    """Per replica: what keeps heartbeats cheap. A heartbeat that only says "still alive"
    (no report, or the report the store already holds) is batched and written with the
    others at most FLUSH_SECONDS later; registers, changed reports and a replica's first
    heartbeat of a workspace are written before the call returns. Tokens are looked up at
    most every TOKEN_CACHE_SECONDS."""

    def __init__(self) -> None:
        self.known: set[str] = set()  # registered, as far as this replica has seen
        self.alive: dict[str, datetime] = {}  # still-alive times waiting for the flush
        self.tokens: dict[str, tuple[str, float]] = {}  # token hash -> (owner, valid until)

    def owner(self, sessions: Sessions, token_hash: str) -> str | None:
        cached = self.tokens.get(token_hash)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        with transaction(sessions) as session:
            owner = queries.token_workspace(session, token_hash)
        if owner is None:
            self.tokens.pop(token_hash, None)
        else:
            if len(self.tokens) > 1_000_000:
                self.tokens.clear()
            self.tokens[token_hash] = (owner, now + TOKEN_CACHE_SECONDS)
        return owner

    def flush(self, sessions: Sessions) -> int:
        if not self.alive:
            return 0
        batch, self.alive = self.alive, {}
        try:
            with transaction(sessions) as session:
                queries.touch(session, batch)
        except DatabaseError:
            for workspace_id, seen in batch.items():  # keep them for the next flush
                self.alive.setdefault(workspace_id, seen)
            raise
        return len(batch)


INGEST: web.AppKey[Ingest] = web.AppKey("ingest", Ingest)


async def _flusher(app: web.Application) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                app[INGEST].flush(app[SESSIONS])
            except DatabaseError as error:
                log.error("could not record heartbeats, retrying: %s", error)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    try:
        app[INGEST].flush(app[SESSIONS])
    except DatabaseError as error:
        log.error("could not record the last heartbeats: %s", error)



class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RequestError(401, "missing bearer token: send `Authorization: Bearer <token>`")
    return token.strip()


async def _body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise RequestError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as error:
        raise RequestError(413, f"body larger than {MAX_BODY_BYTES} bytes") from error
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, f"malformed JSON: {error}") from error


Model = type[api.RegisterRequest] | type[api.HeartbeatRequest]


async def _authorized(request: web.Request, model: Model) -> Any:
    """The validated request, once its token is known to belong to its workspace."""
    token = _bearer(request)
    owner = request.app[INGEST].owner(request.app[SESSIONS], tokens.digest(token))
    if owner is None:
        raise RequestError(401, "unknown or revoked token")
    body = await _body(request)
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    try:
        parsed = model.model_validate(body)
    except pydantic.ValidationError as error:
        raise RequestError(422, api.describe_errors(error)) from error
    if not hmac.compare_digest(owner.encode(), parsed.workspace_id.encode()):
        raise RequestError(403, f"this token does not belong to workspace {parsed.workspace_id!r}")
    return parsed


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as error:
        return _error(error.status, error.message)
    except DatabaseError as error:
        log.error("store unavailable while serving %s: %s", request.path, error)
        return _error(503, "store unavailable, retry later")


async def register(request: web.Request) -> web.Response:
    parsed: api.RegisterRequest = await _authorized(request, api.RegisterRequest)
    with transaction(request.app[SESSIONS]) as session:
        queries.record_register(session, parsed.workspace_id, parsed.url, parsed.report(),
                                utcnow())
    ingest = request.app[INGEST]
    ingest.known.add(parsed.workspace_id)
    ingest.alive.pop(parsed.workspace_id, None)
    request.app[HINT](parsed.workspace_id)
    log.info("registered %s at %s", parsed.workspace_id, parsed.url)
    return web.json_response({"status": "online"})


async def heartbeat(request: web.Request) -> web.Response:
    parsed: api.HeartbeatRequest = await _authorized(request, api.HeartbeatRequest)
    workspace_id = parsed.workspace_id
    ingest = request.app[INGEST]
    report = parsed.report()
    if report is not None:
        # Written (and the loop hinted) only when it differs from what the store holds,
        # whoever changed that last: the runtime, or the loop after an install.
        with transaction(request.app[SESSIONS]) as session:
            changed = queries.record_changed_report(session, workspace_id, report, utcnow())
        if changed:
            ingest.known.add(workspace_id)
            ingest.alive.pop(workspace_id, None)
            request.app[HINT](workspace_id)
            return web.json_response({"status": "ok"})
    if workspace_id in ingest.known:
        ingest.alive[workspace_id] = utcnow()  # a mere "still alive": batched
        return web.json_response({"status": "ok"})
    with transaction(request.app[SESSIONS]) as session:
        registered = queries.record_heartbeat(session, workspace_id, None, utcnow())
    if not registered:
        raise RequestError(409, f"workspace {workspace_id!r} has not registered: "
                                "POST /registry/register first")
    ingest.known.add(workspace_id)
    return web.json_response({"status": "ok"})


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def issue_token(sessions: Sessions, workspace_id: str, issuer: str = "cli") -> str:
    """Create a registry token for a workspace; the caller shows it once, only its hash is
    kept."""
    secret = tokens.generate()
    with transaction(sessions) as session:
        queries.add_token(session, workspace_id, tokens.digest(secret), utcnow(), issuer)
    return secret


def _no_hint(_workspace_id: str) -> None:
    return None


def make_app(sessions: Sessions, hint: Hint | None = None) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[SESSIONS] = sessions
    app[HINT] = hint or _no_hint
    app[INGEST] = Ingest()
    app.cleanup_ctx.append(_flusher)
    app.router.add_post("/registry/register", register)
    app.router.add_post("/registry/heartbeat", heartbeat)
    app.router.add_get("/healthz", healthz)
    return app
