"""Service functions: what the CLI (and the HTTP API) do, on a `Store`.

They validate input into records, call store verbs and shape answers as plain JSON
objects; they never print and never parse command lines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from dispatcher import limits
from dispatcher.clock import Clock, SystemClock
from dispatcher.config import Settings
from dispatcher.errors import BadRequest, NotFound
from dispatcher.limits import MAX_PRIORITY
from dispatcher.models import Attempt, Dispatch, DispatchStatus, NewDispatch, Reservation
from dispatcher.planners import check_params, task_gate_key
from dispatcher.purge import gate_cutoff
from dispatcher.store.base import Store

BATCH_CHUNK = 1000
MAX_KEY_LENGTH = 500
SUBMIT_FIELDS = frozenset({"task", "params", "key", "priority"})


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """A submission as it arrives, before validation."""

    task: str
    params: Any
    key: str | None = None
    priority: int | None = None


def validate_request(settings: Settings, request: SubmitRequest) -> NewDispatch:
    """A submission checked against the config; `BadRequest` names what is wrong."""
    task = settings.tasks.get(request.task)
    if task is None:
        known = ", ".join(sorted(settings.tasks)) or "none configured"
        raise BadRequest(f"unknown task {request.task!r} (known: {known})")
    if not isinstance(request.params, dict):
        raise BadRequest(f"params must be a JSON object, got {type(request.params).__name__}")
    if any(not isinstance(name, str) for name in request.params):
        raise BadRequest("params: names must be strings")
    try:
        limits.check_params(request.params)
    except limits.Refused as exc:
        raise BadRequest(exc.located("params")) from None
    if request.key is not None:
        _check_key(request.key)
    priority = task.priority if request.priority is None else request.priority
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise BadRequest(f"priority must be an integer, got {priority!r}")
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise BadRequest(f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}")
    check_params(request.task, task, request.params)
    return NewDispatch(
        task=request.task,
        params=request.params,
        key=request.key,
        priority=priority,
        gate_key=task_gate_key(request.task, task, request.params),
    )


def _check_key(key: str) -> None:
    if not 0 < len(key) <= MAX_KEY_LENGTH:
        raise BadRequest(f"key must be 1 to {MAX_KEY_LENGTH} characters")
    problem = limits.text_problem(key)  # e.g. undecodable bytes in argv
    if problem is not None:
        raise BadRequest(f"key: {problem}")


async def submit(
    settings: Settings, store: Store, clock: Clock, request: SubmitRequest
) -> Reservation:
    """Validate and reserve one dispatch (idempotent on its key)."""
    new = validate_request(settings, request)
    return await store.check_and_reserve(new, clock.now())


def parse_batch_line(number: int, line: str) -> SubmitRequest:
    """One JSON line of `submit --batch`: {"task", "params", "key", "priority"}."""
    try:
        item = limits.load_json(line, outer_levels=1)
    except ValueError as exc:
        raise limits.refuse_as(BadRequest, f"batch line {number}", exc) from None
    try:
        return request_from_json(item)
    except BadRequest as exc:
        raise BadRequest(f"batch line {number}: {exc.message}") from None


def request_from_json(item: Any) -> SubmitRequest:
    """A submission from a decoded JSON object (a batch line, an HTTP body)."""
    if not isinstance(item, dict):
        raise BadRequest("expected a JSON object")
    unknown = set(item) - SUBMIT_FIELDS
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}")
    if not isinstance(item.get("task"), str):
        raise BadRequest("'task' (a string) is required")
    key = item.get("key")
    if key is not None and not isinstance(key, str):
        raise BadRequest("'key' must be a string")
    return SubmitRequest(item["task"], item.get("params", {}), key, item.get("priority"))


def validate_batch(settings: Settings, lines: Iterable[str]) -> list[NewDispatch]:
    """Every line checked before anything is written: one bad line refuses the batch."""
    news = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        request = parse_batch_line(number, line)
        try:
            news.append(validate_request(settings, request))
        except BadRequest as exc:
            raise BadRequest(f"batch line {number}: {exc.message}") from None
    return news


async def submit_batch(
    store: Store,
    clock: Clock,
    news: list[NewDispatch],
    on_chunk: Callable[[list[Reservation | Exception]], None] | None = None,
) -> list[Reservation | Exception]:
    """Reserve validated dispatches, one transaction per chunk of `BATCH_CHUNK`.

    `on_chunk` sees each chunk's answers once that chunk is committed, so a caller can
    report what was saved even when a later chunk fails (e.g. the disk is full).
    """
    answers: list[Reservation | Exception] = []
    for chunk in _chunks(news, BATCH_CHUNK):
        saved = await store.reserve_many(chunk, clock.now())
        answers.extend(saved)
        if on_chunk is not None:
            on_chunk(saved)
    return answers


def _chunks(items: list[NewDispatch], size: int) -> Iterator[list[NewDispatch]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def reservation_json(reservation: Reservation) -> dict[str, Any]:
    return {"id": reservation.id, "status": str(reservation.status), "created": reservation.created}


# -- reading ------------------------------------------------------------------------------


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {
        "step": attempt.step,
        "runner": attempt.runner,
        "attempt": attempt.attempt,
        "status": str(attempt.status),
        "started_at": _ts(attempt.started_at),
        "ended_at": _ts(attempt.ended_at),
        "exit_code": attempt.exit_code,
        "error": attempt.error,
        "output": attempt.output,
    }


def dispatch_json(dispatch: Dispatch, attempts: list[Attempt] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": dispatch.id,
        "task": dispatch.task,
        "status": str(dispatch.status),
        "params": dispatch.params,
        "key": dispatch.key,
        "priority": dispatch.priority,
        "plan": None if dispatch.plan is None else [step.to_json() for step in dispatch.plan],
        "current_step": dispatch.current_step,
        "error": dispatch.error,
        "created_at": _ts(dispatch.created_at),
        "started_at": _ts(dispatch.started_at),
        "finished_at": _ts(dispatch.finished_at),
        "not_before": _ts(dispatch.not_before),
    }
    if attempts is not None:
        data["attempts"] = [attempt_json(attempt) for attempt in attempts]
    return data


def _known_id(dispatch_id: int) -> int:
    """Ids are positive 64-bit integers: any other cannot name a dispatch."""
    if not 1 <= dispatch_id <= limits.INT_MAX:
        raise NotFound(f"no dispatch with id {dispatch_id}")
    return dispatch_id


async def show(store: Store, dispatch_id: int) -> dict[str, Any]:
    dispatch = await store.get_dispatch(_known_id(dispatch_id))
    if dispatch is None:
        raise NotFound(f"no dispatch with id {dispatch_id}")
    return dispatch_json(dispatch, await store.list_attempts(dispatch_id))


async def list_dispatches(
    store: Store, status: DispatchStatus | None, limit: int
) -> list[dict[str, Any]]:
    return [dispatch_json(d) for d in await store.list_dispatches(status, limit)]


async def cancel(store: Store, clock: Clock, dispatch_id: int) -> dict[str, Any]:
    dispatch = await store.request_cancel(_known_id(dispatch_id), clock.now())
    return {
        "id": dispatch.id,
        "status": str(dispatch.status),
        "cancel_requested": dispatch.cancel_requested,
    }


def gate_capacities(settings: Settings) -> dict[str, int]:
    """Configured gates: `global` and one per runner with a `concurrency`."""
    capacities = {"global": settings.gate.global_}
    for name, runner in settings.runners.items():
        if runner.concurrency is not None:
            capacities[f"runner:{name}"] = runner.concurrency
    return capacities


def _capacity(settings: Settings, configured: Mapping[str, int], gate: str) -> int | None:
    if gate in configured:
        return configured[gate]
    if gate.startswith("task:"):
        task = settings.tasks.get(gate.split(":", 2)[1])
        return task.concurrency if task else None
    return None


async def gates_report(
    settings: Settings, store: Store, clock: Clock | None = None
) -> dict[str, Any]:
    """Every gate with capacity, held count and holders, from the `gates` rows.

    `rows.purgeable`: released rows old enough for the next purge to delete.
    """
    configured = gate_capacities(settings)
    holders: dict[str, list[str]] = {name: [] for name in configured}
    for row in await store.held_slots():
        holders.setdefault(row.gate, []).append(row.holder)
    counts = await store.gate_row_counts()
    gates = [
        {
            "name": name,
            "capacity": _capacity(settings, configured, name),
            "held": len(holders[name]),
            "holders": sorted(holders[name]),
        }
        for name in sorted(holders, key=lambda n: (n != "global", n))
    ]
    now = (clock or SystemClock()).now()
    purgeable = await store.count_purgeable(gate_cutoff(settings, now))
    rows = {"held": counts.held, "released": counts.released, "purgeable": purgeable}
    return {"gates": gates, "rows": rows}


async def health(settings: Settings, store: Store, clock: Clock) -> dict[str, Any]:
    """Live instances: not stopped, heartbeat within `instance_ttl`."""
    since = clock.now() - timedelta(seconds=settings.daemon.instance_ttl)
    instances = await store.live_instances(since)
    return {
        "live": bool(instances),
        "instances": [
            {
                "id": inst.id,
                "hostname": inst.hostname,
                "pid": inst.pid,
                "started_at": _ts(inst.started_at),
                "heartbeat_at": _ts(inst.heartbeat_at),
            }
            for inst in instances
        ],
        "queue": {str(status): count for status, count in (await store.count_by_status()).items()},
    }


# -- status: the whole picture for an operator --------------------------------------------

STATUS_IN_FLIGHT_LIMIT = 20
STATUS_FAILURES_LIMIT = 5


def _current_step(dispatch: Dispatch) -> str | None:
    """The step a dispatch is at (`None` while it has no plan yet)."""
    if dispatch.plan is None or dispatch.current_step >= len(dispatch.plan):
        return None
    return dispatch.plan[dispatch.current_step].name


def _in_flight_json(dispatch: Dispatch, now: datetime) -> dict[str, Any]:
    since = dispatch.started_at or dispatch.updated_at
    return {
        "id": dispatch.id,
        "task": dispatch.task,
        "status": str(dispatch.status),
        "step": _current_step(dispatch),
        "step_index": dispatch.current_step,
        "steps": None if dispatch.plan is None else len(dispatch.plan),
        "started_at": _ts(dispatch.started_at),
        "running_s": max(0, round((now - since).total_seconds())),
    }


async def status(settings: Settings, store: Store, clock: Clock) -> dict[str, Any]:
    """Live instances, queue by status, gates, in-flight dispatches, recent failures."""
    now = clock.now()
    live = await health(settings, store, clock)
    in_flight = [
        dispatch
        for state in (DispatchStatus.RUNNING, DispatchStatus.PLANNING)
        for dispatch in await store.list_dispatches(state, STATUS_IN_FLIGHT_LIMIT)
    ]
    in_flight.sort(key=lambda d: d.id)
    failures = await store.list_dispatches(DispatchStatus.FAILED, STATUS_FAILURES_LIMIT)
    return {
        "live": live["live"],
        "instances": live["instances"],
        "queue": {str(s): live["queue"].get(str(s), 0) for s in DispatchStatus},
        "gates": (await gates_report(settings, store))["gates"],
        "in_flight": [_in_flight_json(d, now) for d in in_flight[:STATUS_IN_FLIGHT_LIMIT]],
        "recent_failures": [
            {"id": d.id, "task": d.task, "error": d.error, "finished_at": _ts(d.finished_at)}
            for d in failures
        ],
    }
