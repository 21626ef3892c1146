"""The registry API: runtimes register and heartbeat here. It only records facts (status,
URL, last seen, reported plugins) and may hint the loop to look sooner; it never calls a
runtime."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic
from aiohttp import web

from controller import api, tokens
from controller.models import Plugin, utcnow
from controller.store import DatabaseError, Sessions, queries, transaction

log = logging.getLogger("pluginctl.registry")

MAX_BODY_BYTES = 256 * 1024
Hint = Callable[[str], None]

SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions", Sessions)
HINT: web.AppKey[Hint] = web.AppKey("hint", Callable)  # type: ignore[arg-type]
# Per replica: a fingerprint of the last report each workspace sent here, so that only a
# changed report hints the loop (heartbeats repeat the same report over and over).
LAST_REPORTS: web.AppKey[dict[str, int]] = web.AppKey("last_reports", dict)


def _fingerprint(report: list[Plugin]) -> int:
    return hash(tuple(sorted((p.name, p.source, p.digest or "") for p in report)))


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
    with transaction(request.app[SESSIONS]) as session:
        owner = queries.token_workspace(session, tokens.digest(token))
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
    report = parsed.report()
    if report is None:
        request.app[LAST_REPORTS].pop(parsed.workspace_id, None)
    else:
        request.app[LAST_REPORTS][parsed.workspace_id] = _fingerprint(report)
    request.app[HINT](parsed.workspace_id)
    log.info("registered %s at %s", parsed.workspace_id, parsed.url)
    return web.json_response({"status": "online"})


async def heartbeat(request: web.Request) -> web.Response:
    parsed: api.HeartbeatRequest = await _authorized(request, api.HeartbeatRequest)
    report = parsed.report()
    with transaction(request.app[SESSIONS]) as session:
        known = queries.record_heartbeat(session, parsed.workspace_id, report, utcnow())
    if not known:
        raise RequestError(409, f"workspace {parsed.workspace_id!r} has not registered: "
                                "POST /registry/register first")
    if report is not None:
        fingerprint = _fingerprint(report)
        if request.app[LAST_REPORTS].get(parsed.workspace_id) != fingerprint:
            request.app[LAST_REPORTS][parsed.workspace_id] = fingerprint
            request.app[HINT](parsed.workspace_id)
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
    app[LAST_REPORTS] = {}
    app.router.add_post("/registry/register", register)
    app.router.add_post("/registry/heartbeat", heartbeat)
    app.router.add_get("/healthz", healthz)
    return app
