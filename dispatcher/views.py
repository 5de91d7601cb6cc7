"""Typed views: what the service functions answer, for the CLI and the HTTP API alike.

Each view is a frozen dataclass; `to_json()` gives the JSON object that `--json` prints
and the API answers (its keys in field order: the contracts in `openapi.yaml` and the
tests pin them). The CLI's text output reads the same fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from dispatcher.models import AttemptStatus, DispatchStatus, Reservation, Step
from dispatcher.purge import GatePurge, RetentionRun, gate_purge_json, retention_json

OMIT_NONE = {"omit": "none"}
"""Field metadata: the key is left out of `to_json` when the value is None."""
OMIT_FALSE = {"omit": "false"}
"""Field metadata: the key is left out of `to_json` unless the value is true."""


def timestamp(value: datetime | None) -> str | None:
    """A time as the JSON answers give it: ISO 8601 in UTC with a `Z`."""
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def to_json_value(value: Any) -> Any:
    """A field's value as JSON: views and records by their `to_json`, times by
    `timestamp`, enums by their value, sequences as lists."""
    if isinstance(value, View):
        return value.to_json()
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, tuple):
        return [to_json_value(item) for item in value]
    if isinstance(value, Step):
        return value.to_json()
    return value  # JSON already (params, results, counts)


@dataclass(frozen=True, slots=True)
class View:
    """The base of the views: `to_json` by field, in order."""

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            omit = f.metadata.get("omit")
            if (omit == "none" and value is None) or (omit == "false" and not value):
                continue
            answer[f.name] = to_json_value(value)
        return answer


def json_list(views: Sequence[View]) -> list[dict[str, Any]]:
    """A list of views as JSON (`list --json`)."""
    return [view.to_json() for view in views]


# -- submitting ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReservationView(View):
    """A submission's answer: `retried` when the key's failed dispatch was started again
    (`key_reuse = "after_failure"`); `not_before` when one created now waits for its
    time (`--at`, `--in`)."""

    id: int
    status: DispatchStatus
    created: bool
    retried: bool = field(default=False, metadata=OMIT_FALSE)
    not_before: datetime | None = field(default=None, metadata=OMIT_NONE)

    @classmethod
    def of(cls, reservation: Reservation) -> ReservationView:
        return cls(
            reservation.id,
            reservation.status,
            reservation.created,
            reservation.retried,
            reservation.not_before,
        )


@dataclass(frozen=True, slots=True)
class CancelView(View):
    """`cancel`: a queued dispatch is cancelled at once; an in-flight one flagged."""

    id: int
    status: DispatchStatus
    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class RetryView(View):
    """`retry`: queued again from `from_step` (None: from its plan), series `series`."""

    id: int
    status: DispatchStatus
    series: int
    from_step: str | None


# -- reading dispatches ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttemptView(View):
    """An attempt as `show --json` lists it (`result`: the step's JSON value, or null)."""

    step: str
    runner: str
    attempt: int
    status: AttemptStatus
    started_at: datetime | None
    ended_at: datetime | None
    exit_code: int | None
    error: str | None
    output: str | None
    result: Any
    series: int


@dataclass(frozen=True, slots=True)
class BranchView(View):
    """A step running (or waiting for its runner's place) in an in-flight dispatch."""

    step: str
    attempt: int | None
    waiting_for: str | None


@dataclass(frozen=True, slots=True)
class DispatchView(View):
    """A dispatch: `show` (with `attempts` and `running`) and `list` (without)."""

    id: int
    task: str
    status: DispatchStatus
    waiting_for: str | None
    params: Any
    key: str | None
    priority: int
    plan: tuple[Step, ...] | None
    current_step: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    not_before: datetime | None
    series: int
    follows: int | None
    attempts: tuple[AttemptView, ...] | None = field(default=None, metadata=OMIT_NONE)
    running: tuple[BranchView, ...] | None = field(default=None, metadata=OMIT_NONE)


# -- schedules, gates, tasks, purge -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduleView(View):
    """A configured schedule: its trigger and policies, next fire (from the
    configuration), last fire and the status of its last dispatch (from the database)."""

    name: str
    task: str
    cron: str | None
    every: str | None
    timezone: str
    overlap: str
    catch_up: str
    next_fire: datetime | None
    last_fire: datetime | None
    last_outcome: str | None
    last_dispatch_id: int | None
    last_status: DispatchStatus | None


@dataclass(frozen=True, slots=True)
class SchedulesView(View):
    schedules: tuple[ScheduleView, ...]


@dataclass(frozen=True, slots=True)
class GateView(View):
    name: str
    capacity: int | None
    held: int
    holders: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GateRowsView(View):
    """Gate rows held and released; `purgeable`: released rows old enough for the next
    purge to delete."""

    held: int
    released: int
    purgeable: int


@dataclass(frozen=True, slots=True)
class GatesView(View):
    gates: tuple[GateView, ...]
    rows: GateRowsView


@dataclass(frozen=True, slots=True)
class TaskView(View):
    """A configured task with its params (`params`: as each declares itself, or the
    params its steps use when none are declared)."""

    name: str
    description: str
    planner: str
    steps: tuple[str, ...]
    declared: bool
    params: tuple[Mapping[str, Any], ...]
    concurrency: int | None
    priority: int


@dataclass(frozen=True, slots=True)
class TasksView(View):
    tasks: tuple[TaskView, ...]


@dataclass(frozen=True, slots=True)
class PurgeView(View):
    """`purge`: both jobs once, gate rows then expired dispatches (or what they would
    delete, with `dry_run`)."""

    dry_run: bool
    gates: GatePurge
    dispatches: RetentionRun

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "gates": gate_purge_json(self.gates),
            "dispatches": retention_json(self.dispatches),
        }


# -- health and status ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceView(View):
    id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime


@dataclass(frozen=True, slots=True)
class HealthView(View):
    """Live instances (not stopped, heartbeat within `instance_ttl`) and the queue."""

    live: bool
    instances: tuple[InstanceView, ...]
    queue: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class InFlightView(View):
    """A dispatch that holds a `global` place of a live daemon."""

    id: int
    task: str
    status: DispatchStatus
    waiting_for: str | None
    step: str | None
    step_index: int
    steps: int | None
    running: tuple[BranchView, ...]
    started_at: datetime | None
    running_s: int


@dataclass(frozen=True, slots=True)
class FailureView(View):
    id: int
    task: str
    error: str | None
    finished_at: datetime | None
    output_tail: str | None


@dataclass(frozen=True, slots=True)
class QueuedView(View):
    id: int
    task: str
    priority: int
    created_at: datetime
    not_before: datetime | None
    waiting_for: str | None


@dataclass(frozen=True, slots=True)
class StatusView(View):
    """`status`: the whole picture for an operator."""

    live: bool
    instances: tuple[InstanceView, ...]
    queue: Mapping[str, int]
    """Every status, in `DispatchStatus` order, with its count."""
    gates: tuple[GateView, ...]
    in_flight_count: int
    in_flight: tuple[InFlightView, ...]
    stale_instances: tuple[str, ...]
    queued: tuple[QueuedView, ...]
    recent_failures: tuple[FailureView, ...]
