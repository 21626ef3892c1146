"""The registry API: runtimes register and heartbeat here. It only records facts (status,
URL, last seen, reported plugins) and may hint the loop to look sooner; it never calls a
runtime."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pydantic
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from controller.domain import tokens
from controller.domain import wire as api
from controller.domain.models import Plugin, report_digest, utcnow
from controller.domain.networks import RuntimeNetworks
from controller.domain.version import version
from controller.registry.serving import GUARD, LIMITS, ConnectionGuard, Deadlines, Limits
from controller.store import (
    DatabaseError,
    PinnedReader,
    Session,
    Sessions,
    in_thread,
    queries,
    run_transaction,
    transaction,
)

log = logging.getLogger("pluginctl.registry")

MAX_BODY_BYTES = 256 * 1024
Hint = Callable[[str], None]

SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions", Sessions)
HINT: web.AppKey[Hint] = web.AppKey("hint", Callable)  # type: ignore[arg-type]


FLUSH_SECONDS = 1.0  # a mere "still alive" reaches the store within this; so do revocations
# Still-alive times are written in this many batches per FLUSH_SECONDS: binding the
# parameters of a batch holds the GIL, and a whole second's batch (thousands of rows) held it
# for tens of milliseconds at a time, a stall that every request under way waited out.
FLUSH_SLICES = 10
REVOCATION_LOOKBACK = timedelta(minutes=5)  # tolerated clock skew between replicas
LOOKUP_BATCH = 256  # unknown tokens looked up per transaction (short: SQLite has one writer)


@dataclass
class _Waiting:
    workspace_id: str
    report: list[Plugin] | None
    answer: asyncio.Future[bool]  # registered?
    url: str | None = None  # set for a register
    seq: int | None = None
    error: str | None = None  # the runtime's own trouble, part of its report


class Ingest:
    """Per replica: what keeps heartbeats cheap without losing anything that matters.

    - Tokens: every unrevoked token is held in memory (loaded at start, looked up in the
      store on a miss, misses that arrive together in one transaction); revocations are read
      back every FLUSH_SECONDS.
    - Each heartbeat is compared with the store before it is answered, but heartbeats that
      arrive together share one query (a group check, one at a time): unregistered
      workspaces get their 409, and a report that differs from the stored one (whoever wrote
      that last: the runtime, another replica, or the loop after an install) is written in
      the same transaction, so it is durable when the call returns.
    - Registers that arrive together are written in one transaction (before any of them
      is answered).
    - What is left is a mere "still alive": batched and written at most FLUSH_SECONDS later.

    Every store call made for a request runs on a worker thread, one batch at a time: the
    event loop is shared with the passes and every other request, and a query that waits
    (for SQLite's writer, for a busy PostgreSQL) must stall nothing but its own batch."""

    def __init__(self, sessions: Sessions, hint: Hint) -> None:
        self.sessions = sessions
        self.hint = hint
        self.reader = PinnedReader(sessions)
        self.tokens: dict[str, str] = {}  # token hash -> workspace
        self.alive: dict[str, datetime] = {}  # still-alive times waiting for the flush
        self.revocations_read: datetime | None = None
        self._waiting: list[_Waiting] = []
        self._checking: asyncio.Task[None] | None = None
        self._unknown: dict[str, list[asyncio.Future[str | None]]] = {}  # hash -> who asks
        self._looking_up: asyncio.Task[None] | None = None

    def warm_up(self) -> None:
        """Load every unrevoked token (merged under what requests already put here)."""
        started = utcnow()
        with transaction(self.sessions) as session:
            active = queries.all_active_tokens(session)
        for token_hash, owner in active.items():
            self.tokens.setdefault(token_hash, owner)
        if self.revocations_read is None:
            self.revocations_read = started

    async def owner(self, token_hash: str) -> str | None:
        """The workspace a token belongs to (None: unknown or revoked)."""
        owner = self.tokens.get(token_hash)
        if owner is not None:
            return owner
        # One future per request: one of them running out of time cancels only its own.
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._unknown.setdefault(token_hash, []).append(answer)
        if self._looking_up is None:
            self._looking_up = asyncio.create_task(self._look_up_all())
        return await answer

    async def _look_up_all(self) -> None:
        try:
            while self._unknown:
                hashes = list(itertools.islice(self._unknown, LOOKUP_BATCH))
                try:
                    owners = await in_thread(self.sessions, partial(_owners, token_hashes=hashes))
                except DatabaseError as error:
                    for token_hash in hashes:
                        for answer in self._unknown.pop(token_hash):
                            if not answer.done():
                                answer.set_exception(error)
                    continue
                for token_hash in hashes:
                    owner = owners.get(token_hash)
                    if owner is not None:
                        self.tokens[token_hash] = owner
                    for answer in self._unknown.pop(token_hash):
                        if not answer.done():
                            answer.set_result(owner)
        finally:
            self._looking_up = None

    def heartbeat(self, workspace_id: str, report: list[Plugin] | None,
                  seq: int | None = None, error: str | None = None) -> asyncio.Future[bool]:
        """Record a heartbeat; await the answer: False when the workspace never registered.
        (A future, not a coroutine: the hot path of the registry saves the layers.)"""
        return self._queue(_Waiting(workspace_id, report,
                                    asyncio.get_running_loop().create_future(), None, seq, error))

    async def register(self, workspace_id: str, url: str, report: list[Plugin] | None,
                       *, seq: int | None = None, error: str | None = None) -> None:
        """Record a register (durable when this returns)."""
        await self._queue(_Waiting(workspace_id, report,
                                   asyncio.get_running_loop().create_future(), url, seq, error))

    def _queue(self, waiting: _Waiting) -> asyncio.Future[bool]:
        self._waiting.append(waiting)
        if self._checking is None:
            self._checking = asyncio.create_task(self._check_all())
        return waiting.answer

    async def _check_all(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    answers, changed = await asyncio.to_thread(self._check, batch)
                except DatabaseError as error:
                    for waiting in batch:
                        if not waiting.answer.done():
                            waiting.answer.set_exception(error)
                    continue
                now = utcnow()
                for waiting, registered in zip(batch, answers, strict=True):
                    if waiting.url is None and registered and waiting.workspace_id not in changed:
                        self.alive[waiting.workspace_id] = now
                    if not waiting.answer.done():
                        waiting.answer.set_result(registered)
                for workspace_id in changed:
                    self.alive.pop(workspace_id, None)
                    self.hint(workspace_id)
        finally:
            self._checking = None

    async def settle(self) -> None:
        """Wait for the batches under way (their worker threads use the pinned reader)."""
        under_way = [task for task in (self._checking, self._looking_up) if task is not None]
        if under_way:
            await asyncio.wait(under_way)

    def _check(self, batch: list[_Waiting]) -> tuple[list[bool], set[str]]:
        """The group check (on a worker thread: only one batch at a time, so the pinned
        reader is never used by two threads at once)."""
        now = utcnow()
        registers = [waiting for waiting in batch if waiting.url is not None]
        if registers:
            rows = [(w.workspace_id, w.url or "", w.report, w.seq, w.error) for w in registers]
            run_transaction(self.sessions, lambda session: queries.record_registers(
                session, rows, now))
        changed = {waiting.workspace_id for waiting in registers}  # a register always hints
        ids = {waiting.workspace_id for waiting in batch if waiting.url is None}
        stored = self.reader.run(
            lambda connection: queries.stored_report_digests(connection, ids)) if ids else {}
        answers = []
        differ: dict[str, _Waiting] = {}  # per workspace, the report to store
        for waiting in batch:
            workspace_id = waiting.workspace_id
            if waiting.url is not None:
                answers.append(True)
                continue
            answers.append(workspace_id in stored)
            if workspace_id not in stored or waiting.report is None:
                continue
            stored_digest, stored_seq = stored[workspace_id]
            if (waiting.seq is not None and stored_seq is not None
                    and waiting.seq <= stored_seq):
                continue  # replayed or late: a newer report is stored already
            earlier = differ.get(workspace_id)
            if earlier is not None and (waiting.seq or 0) < (earlier.seq or 0):
                continue  # the same burst holds a newer one
            if stored_digest != report_digest(waiting.report, waiting.error):
                differ[workspace_id] = waiting
            else:
                differ.pop(workspace_id, None)
        if differ:
            def record(session: Session) -> set[str]:
                # Conditional: whatever another writer stored meanwhile is compared again.
                return {workspace_id for workspace_id, waiting in differ.items()
                        if queries.record_changed_report(
                            session, workspace_id, waiting.report or [], now=now,
                            seq=waiting.seq, error=waiting.error)}

            changed |= run_transaction(self.sessions, record)
        return answers, changed

    def take_alive(self) -> dict[str, datetime]:
        """The batched heartbeats, for flush() (taken on the event loop's thread)."""
        alive, self.alive = self.alive, {}
        return alive

    def flush(self, alive: dict[str, datetime], *, revocations: bool = True) -> None:
        """Write batched heartbeats and (with `revocations`) forget revoked tokens (may run in
        a worker thread; on failure the batch is put back)."""
        now = utcnow()
        # min(): after the clock jumped back, revocations are stamped before the last read.
        since = min(self.revocations_read or now, now) - REVOCATION_LOOKBACK
        # Revoked rows are pruned a while after revocation (store/queries/prune.py): a
        # registry that could not read them for that long loads the live tokens afresh.
        reload = revocations and now - since > queries.REVOKED_TOKEN_RETENTION / 2
        def write(session: Session) -> tuple[dict[str, str] | None, list[str]]:
            if alive:
                queries.touch(session, alive)
            if reload:
                return queries.all_active_tokens(session), []
            return None, queries.revoked_since(session, since) if revocations else []

        try:
            active, revoked = run_transaction(self.sessions, write)
        except DatabaseError:
            for workspace_id, seen in alive.items():  # keep them for the next flush
                self.alive.setdefault(workspace_id, seen)
            raise
        if active is not None:
            log.warning("revocations not read for %s: token cache reloaded", now - since)
            self.tokens = active
        for token_hash in revoked:
            self.tokens.pop(token_hash, None)
        if revocations:
            self.revocations_read = now


def _owners(session: Session, token_hashes: Collection[str]) -> dict[str, str]:
    """Token hash -> workspace, for those of these tokens that exist and are not revoked."""
    owners = {}
    for token_hash in token_hashes:
        owner = queries.token_workspace(session, token_hash)
        if owner is not None:
            owners[token_hash] = owner
    return owners


class Metrics(Protocol):
    """What the registry needs of the process's metrics (engine.metrics.Metrics): it
    counts its requests and serves the page; the pass metrics are the loop's business."""

    def observe_request(self, endpoint: str, code: int, seconds: float) -> None: ...

    def render(self) -> bytes: ...


INGEST: web.AppKey[Ingest] = web.AppKey("ingest", Ingest)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
NETWORKS: web.AppKey[RuntimeNetworks] = web.AppKey("networks", RuntimeNetworks)


async def _ingest(app: web.Application) -> AsyncIterator[None]:
    """Warm the token cache (in a thread: serving starts at once, cold), flush batched
    heartbeats FLUSH_SLICES times every FLUSH_SECONDS and read revocations every
    FLUSH_SECONDS (in a thread too)."""
    ingest = app[INGEST]

    async def loop() -> None:
        try:
            await asyncio.to_thread(ingest.warm_up)
        except DatabaseError as error:
            log.warning("could not preload tokens, serving cold: %s", error)
        # What the process holds by now (modules, the token cache) lives as long as it does:
        # kept out of the collector's sight, a full collection no longer scans all of it (it
        # paused the event loop for 50-100 ms every few seconds under heartbeat load). The
        # garbage of the start is collected first, or it would stay for good.
        gc.collect()
        gc.freeze()
        for tick in itertools.count(1):
            await asyncio.sleep(FLUSH_SECONDS / FLUSH_SLICES)
            revocations = tick % FLUSH_SLICES == 0
            alive = ingest.take_alive()
            if not alive and not revocations:
                continue
            try:
                await asyncio.to_thread(partial(ingest.flush, alive, revocations=revocations))
            except DatabaseError as error:
                log.error("could not record heartbeats, retrying: %s", error)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await ingest.settle()
    try:
        await asyncio.to_thread(ingest.flush, ingest.take_alive())
    except DatabaseError as error:
        log.error("could not record the last heartbeats: %s", error)
    await asyncio.to_thread(ingest.reader.close)


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


async def _body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise RequestError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    content = request.content
    if content.is_eof():  # the usual case, it came with the head: take it, no clock to set
        body = content.read_nowait()
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        return body
    seconds = request.app[LIMITS].body_seconds
    try:
        async with asyncio.timeout(seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge as error:
        raise RequestError(413, f"body larger than {MAX_BODY_BYTES} bytes") from error
    except TimeoutError as error:
        raise RequestError(408, f"body not received within {seconds:g}s") from error


Model = type[api.RegisterRequest] | type[api.HeartbeatRequest]


async def _authorized(request: web.Request, model: Model) -> Any:
    """The validated request, once its token is known to belong to its workspace."""
    token_hash = tokens.digest(_bearer(request))
    ingest = request.app[INGEST]
    owner = ingest.tokens.get(token_hash)  # the usual case: no coroutine for a cache hit
    if owner is None:
        owner = await ingest.owner(token_hash)
    if owner is None:
        raise RequestError(401, "unknown or revoked token")
    raw = await _body(request)
    try:
        parsed = model.model_validate_json(raw)
    except pydantic.ValidationError as error:
        first = error.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise RequestError(400, f"malformed JSON: {first['msg']}") from error
        if first["type"] == "model_type" and not first["loc"]:
            raise RequestError(400, "the body must be a JSON object") from error
        raise RequestError(422, api.describe_errors(error)) from error
    if not hmac.compare_digest(owner.encode(), parsed.workspace_id.encode()):
        raise RequestError(403, f"this token does not belong to workspace {parsed.workspace_id!r}")
    return parsed


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DEADLINES: web.AppKey[Deadlines] = web.AppKey("deadlines", Deadlines)


async def _answered(request: web.Request, handler: Handler, task: asyncio.Task[Any]
                    ) -> web.StreamResponse:
    """The handler's answer, or the answer to what it raised (RequestError, the store
    unavailable, the handler deadline)."""
    try:
        return await handler(request)
    except asyncio.CancelledError:
        if not request.app[DEADLINES].expired(task):
            raise
        task.uncancel()
        seconds = request.app[LIMITS].handler_seconds
        log.error("%s not answered within %gs (store too slow?)", request.path, seconds)
        return _error(503, f"not answered within {seconds:g}s, retry later")
    except RequestError as error:
        return _error(error.status, error.message)
    except DatabaseError as error:
        log.error("store unavailable while serving %s: %s", request.path, error)
        return _error(503, "store unavailable, retry later")


@web.middleware
async def _served(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The registry's one middleware (each layer costs the hot path): tells the connection
    guard the request is under way (its head came in time), holds the handler to
    `handler_seconds` (503 after), turns errors into answers, and counts the request when
    the app has metrics."""
    app = request.app
    connection = app[GUARD].of(request)
    if connection is not None:
        connection.request_started()
    task = asyncio.current_task()
    if task is None:  # aiohttp runs every handler in a task
        raise RuntimeError("a registry request outside a task")
    deadlines = app[DEADLINES]
    deadlines.begin(task)
    metrics = app.get(METRICS)
    started = time.perf_counter()
    code = 500
    try:
        response = await _answered(request, handler, task)
        code = response.status
        return response
    except web.HTTPException as error:
        code = error.status
        raise
    finally:
        deadlines.end(task)
        if connection is not None:
            connection.request_finished()
        if metrics is not None:
            route = request.match_info.route.resource
            metrics.observe_request(route.canonical if route is not None else "other", code,
                                    time.perf_counter() - started)


def _ok(status: bytes) -> web.Response:
    return web.Response(body=b'{"status": "' + status + b'"}', content_type="application/json")


async def register(request: web.Request) -> web.Response:
    parsed: api.RegisterRequest = await _authorized(request, api.RegisterRequest)
    workspace_id = parsed.workspace_id
    reason = request.app[NETWORKS].host_refusal(urlsplit(parsed.url).hostname or "")
    if reason is not None:
        raise RequestError(422, f"url: {reason}")
    await request.app[INGEST].register(workspace_id, parsed.url, parsed.report(), seq=parsed.seq,
                                       error=parsed.error)
    log.info("registered %s at %s", workspace_id, parsed.url)
    return _ok(b"online")


async def heartbeat(request: web.Request) -> web.Response:
    parsed: api.HeartbeatRequest = await _authorized(request, api.HeartbeatRequest)
    if not await request.app[INGEST].heartbeat(parsed.workspace_id, parsed.report(),
                                               parsed.seq, parsed.error):
        raise RequestError(409, f"workspace {parsed.workspace_id!r} has not registered: "
                                "POST /registry/register first")
    return _ok(b"ok")


async def healthz(_request: web.Request) -> web.Response:
    """Serving; and which build serves (`pluginctl --version`'s number)."""
    return web.json_response({"status": "ok", "version": version()})


OPENAPI = Path(__file__).with_name("registry-openapi.json")


async def openapi(_request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


def _no_hint(_workspace_id: str) -> None:
    return None


async def metrics_page(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(sessions: Sessions, hint: Hint | None = None,
             networks: RuntimeNetworks | None = None,
             *, limits: Limits | None = None, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(middlewares=[_served], client_max_size=MAX_BODY_BYTES)
    if metrics is not None:
        app[METRICS] = metrics
        app.router.add_get("/metrics", metrics_page)
    app[LIMITS] = limits or Limits()
    app[GUARD] = ConnectionGuard(app[LIMITS])
    app[DEADLINES] = Deadlines(app[LIMITS].handler_seconds)
    app[SESSIONS] = sessions
    app[NETWORKS] = networks or RuntimeNetworks()
    app[HINT] = hint or _no_hint
    app[INGEST] = Ingest(sessions, app[HINT])
    app.cleanup_ctx.append(_ingest)
    app.router.add_post("/registry/register", register)
    app.router.add_post("/registry/heartbeat", heartbeat)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi)
    return app
