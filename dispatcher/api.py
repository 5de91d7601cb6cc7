"""The HTTP API, served from the daemon's own event loop when `[api] listen` is set.

aiohttp (`AppRunner` + `TCPSite`) runs as a side task of the daemon's task group, so
it starts after recovery and stops with the daemon. Handlers call the same service
functions as the CLI. Errors are JSON `{"error": {"code", "message"}}`. A bearer token
(`api.token_file`) guards everything but `/healthz`, `/readyz` and `/openapi.yaml`;
it is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from importlib import resources
from typing import Any, Protocol

import anyio
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from dispatcher import __version__, limits, logs, service, statuspage
from dispatcher.activity import Activity
from dispatcher.branches import Branch
from dispatcher.clock import Clock
from dispatcher.config import Settings, split_listen
from dispatcher.connections import Acceptor, ConnectionLimiter, connection_cap, listening_sockets
from dispatcher.durations import format_duration
from dispatcher.errors import (
    BadRequest,
    DispatcherError,
    KeyConflict,
    NotFound,
    NotRetryable,
    StoreBusy,
    Unavailable,
)
from dispatcher.gate import GateState
from dispatcher.httpauth import read_token, token_matches
from dispatcher.metrics import CONTENT_TYPE, DaemonMetrics, LiveSources
from dispatcher.models import Dispatch, DispatchStatus
from dispatcher.pipeline import CancelReason
from dispatcher.store.base import Store
from dispatcher.views import BranchView, DispatchView

log = logs.get_logger("dispatcher.api")

MAX_DISPATCH_ID = 2**63 - 1
READY_TIMEOUT = 2.0
"""Seconds the database may take to answer a readiness probe."""
MAX_READY_LAG = 5.0
"""Event-loop lag (seconds) above which the daemon reports itself not ready."""
RECENT_FAILURES = 10
MAX_RUNNING_SHOWN = 50
MAX_QUEUED_SHOWN = 20
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.yaml"})
CHALLENGE = 'Bearer realm="dispatcher", Basic realm="dispatcher"'

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
}


class FlightView(Protocol):
    """A dispatch in flight, as the API reads it (`dispatcher.pipeline.InFlight`)."""

    @property
    def dispatch_id(self) -> int: ...

    @property
    def waiting_for(self) -> str | None: ...

    def running(self) -> list[Branch]: ...


class DaemonView(Protocol):
    """What the API needs of the daemon it serves beside (`dispatcher.daemon.Daemon`):
    the API never imports the daemon, so that the two cannot import each other."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> Store: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def instance_id(self) -> str: ...

    @property
    def activity(self) -> Activity: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def in_flight(self) -> Mapping[int, FlightView]:
        """What the daemon runs now, by dispatch id (read only)."""

    def gate_snapshot(self) -> list[GateState]: ...

    def wake(self) -> None:
        """New work may be there: claim at once."""

    def cancel(self, dispatch_id: int, reason: CancelReason) -> bool:
        """Stop a dispatch the daemon runs now; False when it does not run there."""


class ApiError(Exception):
    """An answer other than success, with its HTTP status and stable error code."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


def _from_dispatcher_error(exc: DispatcherError) -> ApiError:
    if isinstance(exc, KeyConflict):
        return ApiError(409, "key_conflict", exc.message)
    if isinstance(exc, BadRequest):
        return ApiError(422, "bad_request", exc.message)
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", exc.message)
    if isinstance(exc, NotRetryable):
        return ApiError(409, "not_retryable", exc.message)
    if isinstance(exc, StoreBusy):
        return ApiError(503, "busy", exc.message, {"Retry-After": "1"})
    return ApiError(503, "unavailable", exc.message)


@dataclass(frozen=True)
class ApiServer:
    """Where to listen, the token (if any), the connection limits and the metrics."""

    host: str
    port: int
    token: str | None
    max_body: int
    metrics: DaemonMetrics
    max_connections: int = 1024
    idle_timeout: float = 15.0
    read_timeout: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiServer:
        """From `[api]`; reads the token file (a `ConfigError` if it is unusable)."""
        api = settings.api
        if api.listen is None:
            raise ValueError("api.listen is not set")
        host, port = split_listen(api.listen)
        token = read_token(api.token_file) if api.token_file is not None else None
        return cls(
            host,
            port,
            token,
            api.max_body,
            DaemonMetrics(),
            api.max_connections,
            api.idle_timeout,
            api.read_timeout,
        )

    async def serve(
        self,
        daemon: DaemonView,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """A side task of the daemon: serve until cancelled with its task group."""
        loop = asyncio.get_running_loop()
        limiter = ConnectionLimiter(
            connection_cap(self.max_connections), self.idle_timeout, loop.time
        )
        runner = web.AppRunner(
            self.build_app(daemon, limiter),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=2.0,
            keepalive_timeout=self.idle_timeout,
            # After an answer to a request whose body is not all read (408, 413), aiohttp
            # reads on for this long before it closes (10 s by default): a slow client
            # would hold its connection that much longer.
            lingering_time=1.0,
        )
        await runner.setup()
        sockets: list[socket.socket] = []
        try:
            sockets = self._listen()
            assert runner.server is not None  # set up above
            acceptor = Acceptor(sockets, runner.server, limiter)
            sources = LiveSources(daemon.gate_snapshot, lambda: len(daemon.in_flight))
            self.metrics.watch(sources, daemon.instance_id, __version__)
            async with anyio.create_task_group() as tg:
                tg.start_soon(acceptor.serve)
                self._log_started(sockets[0], limiter.max_connections)
                task_status.started()
                await self.metrics.measure_loop_lag()
        finally:
            for sock in sockets:
                sock.close()
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
            log.info("api_stopped")

    def _listen(self) -> list[socket.socket]:
        try:
            return listening_sockets(self.host, self.port)
        except OSError as exc:
            where = f"{self.host}:{self.port}"
            raise Unavailable(f"api.listen {where}: cannot listen: {exc.strerror or exc}") from None

    def _log_started(self, sock: socket.socket, max_connections: int) -> None:
        host, port = sock.getsockname()[:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        log.info(
            "api_started",
            url=url,
            auth=self.token is not None,
            max_connections=max_connections,
            idle_timeout_s=self.idle_timeout,
        )

    def build_app(
        self, daemon: DaemonView, limiter: ConnectionLimiter | None = None
    ) -> web.Application:
        """The aiohttp application: routes, auth, JSON errors, access log."""
        middlewares: list[Middleware] = [self._access_log, _json_errors, self._auth]
        if limiter is not None:
            middlewares.insert(0, _tracking(limiter))
        app = web.Application(client_max_size=self.max_body, middlewares=middlewares)
        routes = _Routes(daemon, self.metrics, self.read_timeout)
        app.add_routes(
            [
                web.post("/v1/dispatches", routes.submit),
                web.get("/v1/dispatches/{id:[0-9]+}", routes.show),
                web.post("/v1/dispatches/{id:[0-9]+}/cancel", routes.cancel),
                web.post("/v1/dispatches/{id:[0-9]+}/retry", routes.retry),
                web.get("/v1/gates", routes.gates),
                web.get("/v1/schedules", routes.schedules),
                web.get("/healthz", routes.healthz),
                web.get("/readyz", routes.readyz),
                web.get("/metrics", routes.metrics),
                web.get("/openapi.yaml", routes.openapi),
                web.get("/", routes.status_page),
                web.get("/dispatches/{id:[0-9]+}", routes.dispatch_page),
            ]
        )
        return app

    # -- middlewares ------------------------------------------------------------------

    @web.middleware
    async def _access_log(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "(unmatched)"
            self.metrics.http_requests.labels(request.method, route, str(status)).inc()
            log.info(
                "http_request",
                method=request.method,
                path=request.path,
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                remote=request.remote,
            )

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.token is not None and request.path not in OPEN_PATHS:
            if not token_matches(request.headers.get("Authorization"), self.token):
                raise ApiError(
                    401,
                    "unauthorized",
                    "a valid bearer token is required (Authorization: Bearer TOKEN)",
                    {"WWW-Authenticate": CHALLENGE},
                )
        return await handler(request)


def _tracking(limiter: ConnectionLimiter) -> Middleware:
    """Marks the connection busy while one of its requests is handled (so it is
    neither idle nor closed to make room meanwhile)."""

    @web.middleware
    async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        limiter.request_started(transport)
        try:
            return await handler(request)
        finally:
            limiter.request_finished(transport)

    return track


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes `{"error": {"code", "message"}}` with its status."""
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, **exc.headers)
        if exc.status == 408:
            response.force_close()  # the rest of the body may still be on its way
        return response
    except DispatcherError as exc:
        err = _from_dispatcher_error(exc)
        return error_response(err.status, err.code, err.message, **err.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        return error_response(exc.status, code, exc.reason.lower(), **headers)
    except Exception:  # a defect: answer 500, log it structured
        log.exception("api_request_failed", method=request.method, path=request.path)
        return error_response(500, "internal", "internal error; see the daemon's log")


async def _json_body(request: web.Request, read_timeout: float) -> Any:
    with anyio.move_on_after(read_timeout) as reading:
        raw = await request.read()  # aiohttp enforces client_max_size (413) while reading
    if reading.cancelled_caught:
        message = f"body: not received within {format_duration(read_timeout)}"
        raise ApiError(408, "request_timeout", message)
    try:
        return limits.load_json(raw, outer_levels=1)  # the body is one object around params
    except ValueError as exc:
        raise limits.refuse_as(BadRequest, "body", exc) from None


def _dispatch_id(request: web.Request) -> int:
    dispatch_id = int(request.match_info["id"])
    if dispatch_id > MAX_DISPATCH_ID:
        raise NotFound(f"no dispatch with id {dispatch_id}")
    return dispatch_id


class _Routes:
    """The handlers, on one daemon."""

    def __init__(self, daemon: DaemonView, metrics: DaemonMetrics, read_timeout: float) -> None:
        self.daemon = daemon
        self._metrics = metrics
        self._read_timeout = read_timeout
        self.started_at = daemon.clock.now()

    async def submit(self, request: web.Request) -> web.Response:
        """POST /v1/dispatches: 201 created, 200 existing (same key), 409, 422."""
        body = await _json_body(request, self._read_timeout)
        submission = service.request_from_json(body)
        d = self.daemon
        reservation = await service.submit(d.settings, d.store, d.clock, submission)
        if reservation.created or reservation.retried:
            d.wake()
        status = 201 if reservation.created else 200
        answer = service.reservation_view(reservation).to_json()
        warnings = service.param_warnings(d.settings, submission)
        if warnings:
            answer["warnings"] = warnings
        return web.json_response(answer, status=status)

    async def show(self, request: web.Request) -> web.Response:
        """GET /v1/dispatches/{id}: the object of `show --json`."""
        return web.json_response((await self._show(_dispatch_id(request))).to_json())

    async def cancel(self, request: web.Request) -> web.Response:
        """POST /v1/dispatches/{id}/cancel: 202; an in-flight dispatch is stopped at once."""
        d = self.daemon
        answer = await service.cancel(d.store, d.clock, _dispatch_id(request))
        if answer.cancel_requested:
            d.cancel(answer.id, CancelReason.USER)
        return web.json_response(answer.to_json(), status=202)

    async def retry(self, request: web.Request) -> web.Response:
        """POST /v1/dispatches/{id}/retry: 202, queued again from its first unfinished
        step; 409 when it is neither failed nor cancelled."""
        d = self.daemon
        answer = await service.retry(d.settings, d.store, d.clock, _dispatch_id(request))
        d.wake()
        return web.json_response(answer.to_json(), status=202)

    async def schedules(self, request: web.Request) -> web.Response:
        """GET /v1/schedules: the object of `schedules --json`."""
        d = self.daemon
        answer = await service.schedules_report(d.settings, d.store, d.clock)
        return web.json_response(answer.to_json())

    async def gates(self, request: web.Request) -> web.Response:
        """GET /v1/gates: the object of `gates --json`."""
        answer = await service.gates_report(self.daemon.settings, self.daemon.store)
        return web.json_response(answer.to_json())

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the loop answers."""
        return web.json_response({"status": "ok", "instance_id": self.daemon.instance_id})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: not draining, the database answers, the loop keeps time."""
        reasons = []
        if self.daemon.stopping:
            reasons.append("stopping")
        with anyio.move_on_after(READY_TIMEOUT) as probe:
            try:
                await self.daemon.store.count_by_status()
            except DispatcherError as exc:
                reasons.append(f"database: {exc.message}")
        if probe.cancelled_caught:
            reasons.append(f"database: no answer within {READY_TIMEOUT:g}s")
        lag = self._metrics.last_loop_lag
        if lag > MAX_READY_LAG:
            reasons.append(f"event loop lag {lag:.1f}s")
        body = {"ready": not reasons, "reasons": reasons}
        return web.json_response(body, status=503 if reasons else 200)

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format; the queue depth is read now."""
        self._metrics.set_queue(await self.daemon.store.count_by_status())
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of this API."""
        text = resources.files("dispatcher").joinpath("openapi.yaml").read_text("utf-8")
        return web.Response(text=text, content_type="application/yaml")

    async def status_page(self, request: web.Request) -> web.Response:
        """The HTML status page."""
        view = await self._status_view()
        return web.Response(text=statuspage.render(view), content_type="text/html")

    async def dispatch_page(self, request: web.Request) -> web.Response:
        """The HTML page of one dispatch: its steps and attempts with their output."""
        data = (await self._show(_dispatch_id(request))).to_json()
        return web.Response(text=statuspage.render_dispatch(data), content_type="text/html")

    async def _show(self, dispatch_id: int) -> DispatchView:
        """`show`; what it waits for is what this daemon knows in memory when the
        dispatch is in flight here."""
        d = self.daemon
        view = await service.show(d.store, dispatch_id, d.settings, d.clock)
        flight = d.in_flight.get(view.id)
        if flight is not None and not view.status.is_final:
            running = tuple(_branch(b) for b in flight.running())
            view = replace(view, waiting_for=flight.waiting_for, running=running)
        return view

    async def _status_view(self) -> statuspage.StatusView:
        d = self.daemon
        # One moment, no await in between: the gates and the flights agree.
        gates = d.gate_snapshot()
        flights = sorted(d.in_flight.values(), key=lambda f: f.dispatch_id)
        now = d.clock.now()
        running = []
        for flight in flights[:MAX_RUNNING_SHOWN]:
            dispatch = await d.store.get_dispatch(flight.dispatch_id)
            if dispatch is not None:
                running.append(_running_row(dispatch, flight))
        full = {gate.name for gate in gates if gate.held >= gate.capacity}
        queued = await d.store.list_dispatches(DispatchStatus.QUEUED, MAX_QUEUED_SHOWN)
        return statuspage.StatusView(
            instance_id=d.instance_id,
            version=__version__,
            started_at=self.started_at,
            now=now,
            stopping=d.stopping,
            gates=gates,
            queue=await d.store.count_by_status(),
            running=running,
            failures=await self._failures(),
            queued=[_queued_row(dispatch, full, now) for dispatch in queued],
            minutes=d.activity.minutes(),
            in_flight=len(flights),
            schedules=(await service.schedules_report(d.settings, d.store, d.clock)).schedules,
        )

    async def _failures(self) -> list[statuspage.FailureRow]:
        store = self.daemon.store
        rows = []
        for failed in await store.list_dispatches(DispatchStatus.FAILED, RECENT_FAILURES):
            tail = service.output_tail(await store.list_attempts(failed.id))
            rows.append(
                statuspage.FailureRow(
                    failed.id, failed.task, failed.finished_at, failed.error, tail
                )
            )
        return rows


def _running_row(dispatch: Dispatch, flight: FlightView) -> statuspage.RunningRow:
    branches = flight.running()
    first = branches[0] if branches else None
    return statuspage.RunningRow(
        dispatch.id,
        dispatch.task,
        str(dispatch.status),
        first.step if first else None,
        dispatch.started_at,
        waiting_for=flight.waiting_for,
        step_index=first.index if first else dispatch.current_step,
        steps=None if dispatch.plan is None else len(dispatch.plan),
        attempt=first.attempt if first else None,
        branches=tuple(
            statuspage.BranchRow(b.step, b.index, b.attempt, b.waiting_for) for b in branches
        ),
    )


def _branch(branch: Branch) -> BranchView:
    """A branch as `show` lists it (no attempt while it waits)."""
    attempt = None if branch.waiting_for else branch.attempt
    return BranchView(branch.step, attempt, branch.waiting_for)


def _queued_row(dispatch: Dispatch, full: set[str], now: datetime) -> statuspage.QueuedRow:
    """A queued dispatch; it waits for its per-task gate when that gate is full here."""
    due = dispatch.not_before is None or dispatch.not_before <= now
    waiting = dispatch.gate_key if due and dispatch.gate_key in full else None
    return statuspage.QueuedRow(
        dispatch.id,
        dispatch.task,
        dispatch.priority,
        dispatch.created_at,
        waiting,
        dispatch.not_before if not due else None,
    )
