"""Service functions: what the CLI (and the HTTP API) do, on a `Store`.

They validate input into records, call store verbs and answer typed views
(`dispatcher.views`, each with its `to_json`); they never print and never parse
command lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dispatcher import limits
from dispatcher import params as declared_params
from dispatcher.clock import Clock, SystemClock
from dispatcher.config import ScheduleSettings, Settings, TaskSettings
from dispatcher.durations import format_duration, parse_duration
from dispatcher.errors import BadRequest, NotFound
from dispatcher.gate import (
    GLOBAL,
    gate_capacities,
    gate_capacity,
    held_by_step,
    runner_gate,
    task_gate_capacity,
    task_gate_key,
)
from dispatcher.graph import Node, resolve_needs
from dispatcher.limits import MAX_PRIORITY
from dispatcher.models import (
    Attempt,
    AttemptStatus,
    Dispatch,
    DispatchStatus,
    NewDispatch,
    Reservation,
    SlotRow,
    Step,
)
from dispatcher.planners import check_params, planner_of
from dispatcher.purge import apply_retention, gate_cutoff, purge_gates
from dispatcher.schedules import FireTimes, fire_key
from dispatcher.store.base import Store
from dispatcher.views import (
    AttemptView,
    BranchView,
    CancelView,
    DispatchView,
    FailureView,
    GateRowsView,
    GatesView,
    GateView,
    HealthView,
    InFlightView,
    InstanceView,
    PurgeView,
    QueuedView,
    ReservationView,
    RetryView,
    SchedulesView,
    ScheduleView,
    StatusView,
    TasksView,
    TaskView,
    timestamp,
)

BATCH_CHUNK = 1000
MAX_KEY_LENGTH = 500
SUBMIT_FIELDS = frozenset({"task", "params", "key", "priority", "at", "in"})


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """A submission as it arrives, before validation."""

    task: str
    params: Any
    key: str | None = None
    priority: int | None = None
    at: datetime | None = None
    """Not before this time (`--at`)."""
    delay: float | None = None
    """Not before this many seconds from the submission (`--in`)."""


def parse_at(text: str, where: str = "--at") -> datetime:
    """An ISO-8601 time with its UTC offset (`2026-12-01T10:00:00Z`, `...+01:00`);
    `BadRequest` otherwise: a time without an offset would be read in some zone."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadRequest(
            f"{where} {text!r}: expected an ISO-8601 time such as 2026-12-01T10:00:00Z"
        ) from None
    if value.utcoffset() is None:
        raise BadRequest(
            f"{where} {text!r}: add its UTC offset (Z, +01:00, ...): a time without one "
            "could mean any zone"
        )
    return value.astimezone(UTC)


def parse_delay(text: object, where: str = "--in") -> float:
    """A duration (`10m`) for `--in`; `BadRequest` naming `where` otherwise."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise BadRequest(f"{where}: {exc}") from None


def not_before(request: SubmitRequest, now: datetime) -> datetime | None:
    """When a submission may start: `at`, or `delay` after `now` (never both)."""
    if request.at is not None and request.delay is not None:
        raise BadRequest("give a start time (at) or a delay (in), not both")
    if request.delay is not None:
        return now + timedelta(seconds=request.delay)
    if request.at is not None and not now - MAX_START_SPAN < request.at < now + MAX_START_SPAN:
        raise BadRequest(f"start time {timestamp(request.at)}: more than 100 years away")
    return request.at


MAX_START_SPAN = timedelta(days=100 * 365)


def validate_request(
    settings: Settings, request: SubmitRequest, now: datetime | None = None
) -> NewDispatch:
    """A submission checked against the config; `BadRequest` names what is wrong.

    `now`: the time a delay (`in`) counts from (the system clock when not given)."""
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
    params = task_params(request.task, task, request.params)
    return NewDispatch(
        task=request.task,
        params=params,
        key=request.key,
        priority=priority,
        gate_key=task_gate_key(request.task, task, params),
        not_before=not_before(request, now or datetime.now(UTC)),
        retry_failed=task.key_reuse == "after_failure",
    )


def task_params(task_name: str, task: TaskSettings, params: dict[str, Any]) -> dict[str, Any]:
    """The params to store: checked against the task's declarations (defaults filled
    in, unknown ones refused), or, for a task without declarations, as given once
    every param its templates use is there."""
    if task.params is not None:
        return declared_params.apply_declared(task_name, task.params, params)
    check_params(task_name, task, params)
    return params


def param_warnings(settings: Settings, request: SubmitRequest) -> list[str]:
    """Params of a task without declarations that none of its templates uses (stored
    anyway, as before declarations existed; most often a typo)."""
    task = settings.tasks.get(request.task)
    if task is None or task.params is not None or planner_of(task).external:
        return []  # declared: unknown ones are refused; an external planner may read any
    if not isinstance(request.params, dict):
        return []
    names = declared_params.unused(request.params, task.params_used())
    if not names:
        return []
    listed = ", ".join(repr(name) for name in names)
    plural = "s" if len(names) > 1 else ""
    return [
        f"task {request.task!r}: param{plural} {listed} used by no step "
        "(stored anyway; declare the task's params to refuse unknown ones)"
    ]


def params_from_text(
    settings: Settings, task_name: str, texts: Mapping[str, str]
) -> dict[str, Any]:
    """`--param NAME=VALUE` values, converted to their declared types (an undeclared
    param, or one of a task without declarations, stays a string)."""
    task = settings.tasks.get(task_name)
    declared = (task.params if task is not None else None) or {}
    values: dict[str, Any] = {}
    for name, text in texts.items():
        spec = declared.get(name)
        if spec is None:
            values[name] = text
            continue
        try:
            values[name] = declared_params.from_text(spec, text)
        except ValueError as exc:
            raise BadRequest(f"--param {name}: task {task_name!r}: {exc}") from None
    return values


def _undeclared_json(name: str) -> dict[str, Any]:
    return {"name": name, "type": None, "required": True, "default": None, "description": ""}


def tasks(settings: Settings) -> TasksView:
    """Every configured task with its params, as `dispatcher tasks --json` shows them."""
    answer = []
    for name in sorted(settings.tasks):
        task = settings.tasks[name]
        declared = task.params
        answer.append(
            TaskView(
                name=name,
                description=task.description,
                planner=task.planner,
                steps=tuple(step.name for step in task.configured_steps()),
                declared=declared is not None,
                params=(
                    tuple(declared[p].to_json(p) for p in sorted(declared))
                    if declared is not None
                    else tuple(_undeclared_json(p) for p in sorted(task.params_used()))
                ),
                concurrency=task.concurrency,
                priority=task.priority,
            )
        )
    return TasksView(tuple(answer))


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
    now = clock.now()
    new = validate_request(settings, request, now)
    return await store.check_and_reserve(new, now)


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
    at = item.get("at")
    if at is not None and not isinstance(at, str):
        raise BadRequest("'at' must be an ISO-8601 time string")
    delay = item.get("in")
    return SubmitRequest(
        item["task"],
        item.get("params", {}),
        key,
        item.get("priority"),
        at=None if at is None else parse_at(at, "'at'"),
        delay=None if delay is None else parse_delay(delay, "'in'"),
    )


MAX_BATCH_ERRORS = 20
"""`submit --batch` reports at most this many bad lines (and warnings); it counts all."""


@dataclass
class CheckedBatch:
    """Every line of a batch checked: the submissions, or why lines were refused."""

    news: list[NewDispatch] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """One message per bad line (`batch line N: ...`), every one of them."""
    warnings: list[str] = field(default_factory=list)


def check_batch(settings: Settings, lines: Iterable[str]) -> CheckedBatch:
    """Check every line before anything is written (blank lines are skipped)."""
    checked = CheckedBatch()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            request = parse_batch_line(number, line)
            checked.news.append(validate_request(settings, request))
        except BadRequest as exc:
            message = exc.message
            named = message.startswith((f"batch line {number}: ", f"batch line {number} /"))
            checked.errors.append(message if named else f"batch line {number}: {message}")
            continue
        checked.warnings += [f"batch line {number}: {w}" for w in param_warnings(settings, request)]
    return checked


def validate_batch(settings: Settings, lines: Iterable[str]) -> list[NewDispatch]:
    """Every line checked before anything is written: one bad line refuses the batch
    (`BadRequest` names the first)."""
    checked = check_batch(settings, lines)
    if checked.errors:
        raise BadRequest(checked.errors[0])
    return checked.news


@dataclass(frozen=True)
class BatchSummary:
    """What a saved batch came to."""

    created: int
    existing: int
    conflicts: int
    ids: list[int]
    """Distinct dispatch ids answered (created or existing), in line order."""

    def text(self) -> str:
        lines = self.created + self.existing + self.conflicts
        return (
            f"{lines} lines: {self.created} created, {self.existing} existing, "
            f"{self.conflicts} conflicts"
        )


def batch_summary(answers: Sequence[Reservation | Exception]) -> BatchSummary:
    reservations = [a for a in answers if isinstance(a, Reservation)]
    created = sum(1 for r in reservations if r.created)
    ids = list(dict.fromkeys(r.id for r in reservations))
    return BatchSummary(created, len(reservations) - created, len(answers) - len(reservations), ids)


@dataclass(frozen=True)
class EndedSummary:
    """How the dispatches of a waited-for batch ended."""

    counts: dict[str, int]
    failures: list[str]
    """`dispatch ID TASK STATUS: error` for each that did not succeed."""

    @property
    def all_succeeded(self) -> bool:
        return not self.failures

    def text(self) -> str:
        total = sum(self.counts.values())
        parts = ", ".join(f"{n} {status}" for status, n in self.counts.items() if n)
        return f"{total} dispatches ended: {parts or 'none'}"


def ended_summary(finals: Sequence[Mapping[str, Any]]) -> EndedSummary:
    counts = {str(s): 0 for s in FINAL_STATUSES}
    failures = []
    for data in sorted(finals, key=lambda d: d["id"]):
        counts[data["status"]] += 1
        if data["status"] != DispatchStatus.SUCCEEDED:
            error = f": {data['error']}" if data.get("error") else ""
            failures.append(f"dispatch {data['id']} {data.get('task', '')} {data['status']}{error}")
    return EndedSummary(counts, failures)


FINAL_STATUSES = (DispatchStatus.SUCCEEDED, DispatchStatus.FAILED, DispatchStatus.CANCELLED)


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


def reservation_view(reservation: Reservation) -> ReservationView:
    """What a submission answers (see `ReservationView`)."""
    return ReservationView.of(reservation)


# -- reading ------------------------------------------------------------------------------


def attempt_view(attempt: Attempt) -> AttemptView:
    """An attempt as `show` lists it (`result`: the step's JSON value, or None)."""
    return AttemptView(
        step=attempt.step,
        runner=attempt.runner,
        attempt=attempt.attempt,
        status=attempt.status,
        started_at=attempt.started_at,
        ended_at=attempt.ended_at,
        exit_code=attempt.exit_code,
        error=attempt.error,
        output=attempt.output,
        result=None if attempt.result is None else json.loads(attempt.result),
        series=attempt.series,
    )


def running_branches(dispatch: Dispatch, attempts: Sequence[Attempt]) -> tuple[BranchView, ...]:
    """The steps an in-flight dispatch runs now, from the database: those with a running
    attempt, in plan order (the daemon's API also knows the ones waiting for a place)."""
    if dispatch.status.is_final:
        return ()
    running = sorted(
        (a for a in attempts if a.status is AttemptStatus.RUNNING), key=lambda a: a.step_index
    )
    return tuple(BranchView(a.step, a.attempt, None) for a in running)


def dispatch_view(
    dispatch: Dispatch, attempts: list[Attempt] | None = None, waiting_for: str | None = None
) -> DispatchView:
    """A dispatch; with its `attempts`, also what it runs now (`show`)."""
    return DispatchView(
        id=dispatch.id,
        task=dispatch.task,
        status=dispatch.status,
        waiting_for=waiting_for,
        params=dispatch.params,
        key=dispatch.key,
        priority=dispatch.priority,
        plan=None if dispatch.plan is None else tuple(dispatch.plan),
        current_step=dispatch.current_step,
        error=dispatch.error,
        created_at=dispatch.created_at,
        started_at=dispatch.started_at,
        finished_at=dispatch.finished_at,
        not_before=dispatch.not_before,
        series=dispatch.series,
        follows=dispatch.follows,
        attempts=None if attempts is None else tuple(attempt_view(a) for a in attempts),
        running=None if attempts is None else running_branches(dispatch, attempts),
    )


def _known_id(dispatch_id: int) -> int:
    """Ids are positive 64-bit integers: any other cannot name a dispatch."""
    if not 1 <= dispatch_id <= limits.INT_MAX:
        raise NotFound(f"no dispatch with id {dispatch_id}")
    return dispatch_id


# -- waiting for a gate ------------------------------------------------------------------


def waiting_for(
    settings: Settings, dispatch: Dispatch, held: Sequence[SlotRow], now: datetime
) -> str | None:
    """The gate a dispatch waits for, derived from the database alone.

    - `running` at a step whose runner is capped, holding no place of `runner:NAME`:
      its attempt starts only once it has one (the attempt row does not exist yet).
    - `queued`, due, with a per-task gate whose places are all held: the daemon does
      not claim it until one is free.

    A daemon knows this in memory too (the status page and the API use that).
    """
    if dispatch.status is DispatchStatus.RUNNING:
        return _runner_waited_for(settings, dispatch, held)
    if dispatch.status is DispatchStatus.QUEUED and dispatch.gate_key is not None:
        if dispatch.not_before is not None and dispatch.not_before > now:
            return None  # waits for its retry time, not for a gate
        capacity = task_gate_capacity(settings, dispatch.gate_key)
        taken = sum(1 for row in held if row.gate == dispatch.gate_key)
        if capacity is not None and taken >= capacity:
            return dispatch.gate_key
    return None


def _runner_waited_for(
    settings: Settings, dispatch: Dispatch, held: Sequence[SlotRow]
) -> str | None:
    """The runner gate a running dispatch waits for: none of the steps it can run now
    (`ready_steps`) runs, and the first on a capped runner holds no place of it."""
    waits = []
    for step in ready_steps(dispatch):
        runner = settings.runners.get(step.runner)
        if runner is None or runner.concurrency is None:
            return None  # runs without a gate (or fails at once)
        gate = runner_gate(step.runner)
        if any(
            row.gate == gate and held_by_step(row.holder, dispatch.id, step.name) for row in held
        ):
            return None
        waits.append(gate)
    return waits[0] if waits else None


def ready_steps(dispatch: Dispatch) -> list[Step]:
    """Steps at or after `current_step` whose needs all lie before it: surely ready
    (the database records done steps only as that prefix)."""
    plan = dispatch.plan or ()
    needs = resolve_needs([Node(step.name, step.needs) for step in plan])
    before = {step.name for step in plan[: dispatch.current_step]}
    return [
        step
        for step in plan[dispatch.current_step :]
        if all(need in before for need in needs[step.name])
    ]


def output_tail(attempts: Sequence[Attempt], lines: int = 5) -> str | None:
    """The last lines of the last failed attempt's output (stderr and stdout)."""
    for attempt in reversed(attempts):
        if attempt.status in (AttemptStatus.FAILED, AttemptStatus.TIMED_OUT) and attempt.output:
            return tail_lines(attempt.output, lines)
    return None


def tail_lines(text: str, lines: int, max_chars: int = 2000) -> str:
    kept = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join(kept)[-max_chars:]


# -- reading, continued -----------------------------------------------------------------


async def show(
    store: Store,
    dispatch_id: int,
    settings: Settings | None = None,
    clock: Clock | None = None,
) -> DispatchView:
    """One dispatch with its attempts; with `settings`, also the gate it waits for."""
    dispatch = await store.get_dispatch(_known_id(dispatch_id))
    if dispatch is None:
        raise NotFound(f"no dispatch with id {dispatch_id}")
    waiting = None
    if settings is not None and not dispatch.status.is_final:
        now = (clock or SystemClock()).now()
        waiting = waiting_for(settings, dispatch, await store.held_slots(), now)
    return dispatch_view(dispatch, await store.list_attempts(dispatch_id), waiting)


async def list_dispatches(
    store: Store,
    status: DispatchStatus | None,
    limit: int,
    settings: Settings | None = None,
    clock: Clock | None = None,
) -> list[DispatchView]:
    """Newest first; with `settings`, each with the gate it waits for."""
    dispatches = await store.list_dispatches(status, limit)
    if settings is None or all(d.status.is_final for d in dispatches):
        return [dispatch_view(d) for d in dispatches]
    held = await store.held_slots()
    now = (clock or SystemClock()).now()
    return [dispatch_view(d, None, waiting_for(settings, d, held, now)) for d in dispatches]


async def cancel(store: Store, clock: Clock, dispatch_id: int) -> CancelView:
    """Cancel a queued dispatch at once; flag an in-flight one for its daemon."""
    dispatch = await store.request_cancel(_known_id(dispatch_id), clock.now())
    return CancelView(dispatch.id, dispatch.status, dispatch.cancel_requested)


async def retry(settings: Settings, store: Store, clock: Clock, dispatch_id: int) -> RetryView:
    """Queue a failed or cancelled dispatch again from its first unfinished step
    (`Store.retry`); its task must still be configured."""
    dispatch = await store.get_dispatch(_known_id(dispatch_id))
    if dispatch is None:
        raise NotFound(f"no dispatch with id {dispatch_id}")
    if dispatch.task not in settings.tasks:
        raise BadRequest(
            f"dispatch {dispatch_id}: task {dispatch.task!r} is no longer in the configuration"
        )
    retried = await store.retry(dispatch_id, clock.now())
    return RetryView(retried.id, retried.status, retried.series, _current_step(retried))


# -- schedules ------------------------------------------------------------------------------


def schedule_dispatch(
    settings: Settings, name: str, spec: ScheduleSettings, at: datetime
) -> NewDispatch:
    """The dispatch of one fire of a schedule, keyed by the fire."""
    request = SubmitRequest(spec.task, dict(spec.params), fire_key(name, at), spec.priority)
    return validate_request(settings, request, at)


async def schedules_report(settings: Settings, store: Store, clock: Clock) -> SchedulesView:
    """Each configured schedule: its trigger and policies, next fire (from the
    configuration), last fire and the status of its last dispatch (from the database)."""
    now = clock.now()
    states = await store.schedule_states() if settings.schedules else {}
    schedules = []
    for name in sorted(settings.schedules):
        spec = settings.schedules[name]
        state = states.get(name)
        schedules.append(
            ScheduleView(
                name=name,
                task=spec.task,
                cron=spec.cron,
                every=None if spec.every is None else format_duration(spec.every),
                timezone=spec.timezone or "UTC",
                overlap=spec.overlap,
                catch_up=spec.catch_up,
                next_fire=FireTimes(spec).next_after(now),
                last_fire=state.last_fire if state else None,
                last_outcome=state.last_outcome if state else None,
                last_dispatch_id=state.last_dispatch_id if state else None,
                last_status=state.last_status if state else None,
            )
        )
    return SchedulesView(tuple(schedules))


async def gates_report(
    settings: Settings,
    store: Store,
    clock: Clock | None = None,
    held: Sequence[SlotRow] | None = None,
) -> GatesView:
    """Every gate with capacity, held count and holders, from the `gates` rows
    (`held`: rows already read, so that a caller's other figures agree with these).

    `rows.purgeable`: released rows old enough for the next purge to delete.
    """
    holders: dict[str, list[str]] = {name: [] for name in gate_capacities(settings)}
    for row in await store.held_slots() if held is None else held:
        holders.setdefault(row.gate, []).append(row.holder)
    counts = await store.gate_row_counts()
    gates = tuple(
        GateView(
            name, gate_capacity(settings, name), len(holders[name]), tuple(sorted(holders[name]))
        )
        for name in sorted(holders, key=lambda n: (n != GLOBAL, n))
    )
    now = (clock or SystemClock()).now()
    purgeable = await store.count_purgeable(gate_cutoff(settings, now))
    return GatesView(gates, GateRowsView(counts.held, counts.released, purgeable))


async def health(settings: Settings, store: Store, clock: Clock) -> HealthView:
    """Live instances: not stopped, heartbeat within `instance_ttl`."""
    since = clock.now() - timedelta(seconds=settings.daemon.instance_ttl)
    instances = await store.live_instances(since)
    return HealthView(
        live=bool(instances),
        instances=tuple(
            InstanceView(inst.id, inst.hostname, inst.pid, inst.started_at, inst.heartbeat_at)
            for inst in instances
        ),
        queue={str(status): count for status, count in (await store.count_by_status()).items()},
    )


# -- status: the whole picture for an operator --------------------------------------------

STATUS_IN_FLIGHT_LIMIT = 20
STATUS_QUEUED_LIMIT = 10
STATUS_FAILURES_LIMIT = 5


def _current_step(dispatch: Dispatch) -> str | None:
    """The step a dispatch is at (`None` while it has no plan yet)."""
    if dispatch.plan is None or dispatch.current_step >= len(dispatch.plan):
        return None
    return dispatch.plan[dispatch.current_step].name


def _in_flight_view(
    dispatch: Dispatch, now: datetime, waiting: str | None, running: tuple[BranchView, ...]
) -> InFlightView:
    since = dispatch.started_at or dispatch.updated_at
    return InFlightView(
        id=dispatch.id,
        task=dispatch.task,
        status=dispatch.status,
        waiting_for=waiting,
        step=_current_step(dispatch),
        step_index=dispatch.current_step,
        steps=None if dispatch.plan is None else len(dispatch.plan),
        running=running,
        started_at=dispatch.started_at,
        running_s=max(0, round((now - since).total_seconds())),
    )


def _holder_id(holder: str) -> int | None:
    """The dispatch id of a `global` holder (`dispatch:ID`)."""
    prefix, _, rest = holder.partition(":")
    return int(rest) if prefix == "dispatch" and rest.isdigit() else None


async def _in_flight(
    settings: Settings, store: Store, held: Sequence[SlotRow], live: set[str], now: datetime
) -> tuple[int, list[InFlightView]]:
    """What holds a `global` place of a live daemon: never more than the cap.

    Read from the gate rows, not from dispatch statuses: a dispatch's `running` row
    and its gate row are written at different moments (a claim commits before its
    place's row; a final status may still be queued while the next claim lands), so
    counting statuses could show more in flight than the gate allows.
    """
    ids = sorted(
        dispatch_id
        for row in held
        if row.gate == GLOBAL and row.instance_id in live
        if (dispatch_id := _holder_id(row.holder)) is not None
    )
    shown = []
    for dispatch_id in ids[:STATUS_IN_FLIGHT_LIMIT]:
        dispatch = await store.get_dispatch(dispatch_id)
        if dispatch is None or dispatch.status not in _IN_FLIGHT:
            continue  # ended (or went back to the queue) since: its place is being freed
        waiting = waiting_for(settings, dispatch, held, now)
        running = running_branches(dispatch, await store.list_attempts(dispatch_id))
        shown.append(_in_flight_view(dispatch, now, waiting, running))
    return len(ids), shown


_IN_FLIGHT = frozenset({DispatchStatus.PLANNING, DispatchStatus.RUNNING})


async def _failures(store: Store) -> list[FailureView]:
    return [
        FailureView(
            dispatch.id,
            dispatch.task,
            dispatch.error,
            dispatch.finished_at,
            output_tail(await store.list_attempts(dispatch.id)),
        )
        for dispatch in await store.list_dispatches(DispatchStatus.FAILED, STATUS_FAILURES_LIMIT)
    ]


async def _queued(
    settings: Settings, store: Store, held: Sequence[SlotRow], now: datetime
) -> list[QueuedView]:
    return [
        QueuedView(
            d.id,
            d.task,
            d.priority,
            d.created_at,
            d.not_before,
            waiting_for(settings, d, held, now),
        )
        for d in await store.list_dispatches(DispatchStatus.QUEUED, STATUS_QUEUED_LIMIT)
    ]


async def status(settings: Settings, store: Store, clock: Clock) -> StatusView:
    """Live instances, queue by status, gates, in-flight dispatches, recent failures.

    The gate rows are read once, first: the gates, the in-flight list and the gates
    named as waited for all come from that one reading.
    """
    now = clock.now()
    held = await store.held_slots()
    live = await health(settings, store, clock)
    live_ids = {inst.id for inst in live.instances}
    count, in_flight = await _in_flight(settings, store, held, live_ids, now)
    stale = sorted(
        {row.instance_id or "unknown" for row in held if row.instance_id not in live_ids}
    )
    return StatusView(
        live=live.live,
        instances=live.instances,
        queue={str(s): live.queue.get(str(s), 0) for s in DispatchStatus},
        gates=(await gates_report(settings, store, clock, held)).gates,
        in_flight_count=count,
        in_flight=tuple(in_flight),
        stale_instances=tuple(stale),
        queued=tuple(await _queued(settings, store, held, now)),
        recent_failures=tuple(await _failures(store)),
    )


# -- purge -----------------------------------------------------------------------------------


async def purge(
    settings: Settings, store: Store, clock: Clock, *, dry_run: bool = False
) -> PurgeView:
    """`dispatcher purge`: both jobs once, now: gate rows, then expired dispatches."""
    gates = await purge_gates(settings, store, clock, dry_run=dry_run)
    dispatches = await apply_retention(settings, store, clock, dry_run=dry_run)
    return PurgeView(dry_run, gates, dispatches)


# -- files the daemon will need ----------------------------------------------------------------


def usable_files(settings: Settings) -> list[str]:
    """What stands in the way of the daemon's files for the user who asks: the database
    folder that cannot be created or written, a database file that cannot be written,
    a token file that cannot be read. Empty when all is well."""
    problems: list[str] = []
    if settings.database.url is None:
        problems += _database_problems(settings.database.path)
    token = settings.api.token_file
    if token is not None and not os.access(token, os.R_OK):
        reason = "does not exist" if not token.exists() else "cannot be read by this user"
        problems.append(f"api.token_file {token} {reason}")
    return problems


def _database_problems(path: Path) -> list[str]:
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return [f"database.path {path} cannot be read and written by this user"]
        folder = path.parent
    else:
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            return [f"database.path {path}: {folder} is not a folder"]
    # SQLite writes its -wal and -shm files (and the daemon its lock) beside the file.
    if not os.access(folder, os.W_OK | os.X_OK):
        return [f"database.path {path}: cannot create files in {folder} as this user"]
    return []
