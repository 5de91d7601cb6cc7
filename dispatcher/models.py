"""Records that cross layers: frozen dataclasses and status enums, no dict soup."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal


class DispatchStatus(StrEnum):
    QUEUED = "queued"
    PLANNING = "planning"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_DISPATCH_STATUSES


FINAL_DISPATCH_STATUSES = frozenset(
    {DispatchStatus.SUCCEEDED, DispatchStatus.FAILED, DispatchStatus.CANCELLED}
)


class AttemptStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


PLAN_STEP_INDEX = -1
"""`attempts.step_index` of an external planner's attempt (it runs before step 0)."""

PLAN_STEP_NAME = "(plan)"
PLANNER_RUNNER = "planner"

SHUTDOWN_INTERRUPTION = "interrupted by daemon shutdown"
LEASE_INTERRUPTION = "interrupted: this daemon's lease expired or was taken"
"""`attempts.error` of an attempt stopped by a graceful shutdown (not a crash)."""

RESOURCE_SHORTAGE = "not started for lack of a resource"
"""`attempts.error` prefix of an `interrupted` attempt whose process could not be
started (EMFILE, ENFILE, EAGAIN, ENOMEM): the host's fault, not the step's. It is tried
again later and uses up no retry."""


def is_resource_shortage(status: AttemptStatus, error: str | None) -> bool:
    """Whether an attempt (or an outcome) is a resource shortage (`RESOURCE_SHORTAGE`)."""
    return status is AttemptStatus.INTERRUPTED and (error or "").startswith(RESOURCE_SHORTAGE)


OnFailure = Literal["finish_siblings", "cancel_siblings"]
"""What a step that fails for good does to the steps running beside it: let them end
(the dispatch fails once they have), or cancel them at once."""


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a plan, with its params already filled in.

    `templated`: its args and kwargs use results of earlier steps and are stored in
    template form (see `dispatcher.templating`), filled when the step starts.
    """

    name: str
    runner: str
    args: tuple[str, ...] = ()
    timeout: float = 3600.0
    retries: int = 0
    backoff: float = 1.0
    backoff_max: float = 300.0
    call: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] | None = None
    """Steps that must succeed first; None: the step before it (see `dispatcher.graph`)."""
    on_failure: OnFailure = "finish_siblings"
    templated: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "runner": self.runner,
            "args": list(self.args),
            "timeout": self.timeout,
            "retries": self.retries,
            "backoff": self.backoff,
            "backoff_max": self.backoff_max,
        }
        if self.call is not None:
            data["call"] = self.call
        if self.kwargs:
            data["kwargs"] = self.kwargs
        if self.needs is not None:
            data["needs"] = list(self.needs)
        if self.on_failure != "finish_siblings":
            data["on_failure"] = self.on_failure
        if self.templated:
            data["templated"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Step:
        return cls(
            name=data["name"],
            runner=data["runner"],
            args=tuple(data.get("args", ())),
            timeout=float(data.get("timeout", 3600.0)),
            retries=int(data.get("retries", 0)),
            backoff=float(data.get("backoff", 1.0)),
            backoff_max=float(data.get("backoff_max", 300.0)),
            call=data.get("call"),
            kwargs=dict(data.get("kwargs", {})),
            needs=None if data.get("needs") is None else tuple(data["needs"]),
            on_failure=data.get("on_failure", "finish_siblings"),
            templated=bool(data.get("templated", False)),
        )


def fingerprint(task: str, params: dict[str, Any]) -> str:
    """A stable digest of task + params: the identity an idempotency key is bound to."""
    canonical = json.dumps([task, params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class NewDispatch:
    """A validated submission, ready for `Store.check_and_reserve`."""

    task: str
    params: dict[str, Any]
    key: str | None = None
    priority: int = 0
    gate_key: str | None = None
    """Name of the per-task gate this dispatch needs (`task:NAME` or `task:NAME:VALUE`)."""
    not_before: datetime | None = None
    """Not claimed before this time (`submit --at` / `--in`; a schedule's fire never)."""
    follows: int | None = None
    """Not claimed while this dispatch is unfinished (a schedule's `overlap = "queue"`)."""
    retry_failed: bool = False
    """A failed or cancelled dispatch holding the key is started again instead of
    answered (`key_reuse = "after_failure"`)."""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.task, self.params)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What `check_and_reserve` answers: the dispatch and whether it was created now."""

    id: int
    status: DispatchStatus
    created: bool
    retried: bool = False
    """The key's dispatch had failed (or was cancelled) and was started again."""
    not_before: datetime | None = None
    """When a dispatch created now may start (`--at`, `--in`)."""


@dataclass(frozen=True, slots=True)
class Dispatch:
    id: int
    task: str
    params: dict[str, Any]
    key: str | None
    fingerprint: str
    priority: int
    status: DispatchStatus
    plan: tuple[Step, ...] | None
    current_step: int
    gate_key: str | None
    not_before: datetime | None
    cancel_requested: bool
    error: str | None
    instance_id: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    claims: int = 0
    """How many times a daemon has taken this dispatch (1 on its first run)."""
    series: int = 0
    """How many times it was started again after it failed or was cancelled (`retry`)."""
    follows: int | None = None
    """It is not claimed while this dispatch is unfinished."""

    @property
    def resumed(self) -> bool:
        """Claimed before: earlier attempts may exist (a fresh dispatch has none)."""
        return self.claims != 1

    def step_token(self, step: str) -> str:
        """The same for every attempt of `step` of this dispatch, across retries and
        restarts, and different for every other step and dispatch (`DISPATCHER_STEP_TOKEN`):
        a digest of what never changes about the dispatch, and the step's name."""
        stamp = self.created_at.isoformat()
        material = json.dumps([self.id, stamp, self.fingerprint, step], separators=(",", ":"))
        return hashlib.sha256(material.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Attempt:
    id: int
    dispatch_id: int
    step_index: int
    step: str
    runner: str
    attempt: int
    status: AttemptStatus
    started_at: datetime
    ended_at: datetime | None
    exit_code: int | None
    error: str | None
    output: str | None
    instance_id: str | None
    result: str | None = None
    """What the step gave back, as JSON text (None: nothing)."""
    series: int = 0
    """The dispatch's `series` when the attempt started (0: before any retry)."""


@dataclass(frozen=True, slots=True)
class SlotRow:
    """One row of `gates`: a slot held (released_at None) or given back."""

    id: int
    gate: str
    holder: str
    instance_id: str | None
    acquired_at: datetime
    released_at: datetime | None
    recovered: bool


@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    hostname: str
    pid: int
    version: str
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What start-up recovery found left behind by a previous instance."""

    slots_released: int
    attempts_interrupted: int
    dispatches_requeued: int


@dataclass(frozen=True, slots=True)
class GateRowCounts:
    held: int
    released: int


@dataclass(frozen=True, slots=True)
class ExpiredDispatches:
    """Finished dispatches removed (or found) by retention, and their attempts."""

    dispatches: int
    attempts: int


Overlap = Literal["skip", "queue", "allow"]
"""What a schedule's fire does while the schedule's previous dispatch is unfinished:
no dispatch (`skip`), a dispatch that starts once the previous one has ended (`queue`),
or a dispatch that may run beside it (`allow`)."""


class FireOutcome(StrEnum):
    """What became of one fire of a schedule (`Store.fire_schedule`)."""

    DISPATCHED = "dispatched"
    """A dispatch was made for it now."""
    EXISTING = "existing"
    """Its dispatch (its key) was already there."""
    SKIPPED = "skipped"
    """`overlap = "skip"` and the previous dispatch was unfinished: no dispatch."""
    SEEN = "seen"
    """A fire at that time or later was handled already (by another daemon, or before a
    restart): nothing was done."""


@dataclass(frozen=True, slots=True)
class Fired:
    """The answer of `Store.fire_schedule`."""

    outcome: FireOutcome
    dispatch_id: int | None = None
    """The fire's dispatch (dispatched or existing), or the unfinished one it skipped for."""


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """What the database knows of a schedule: its latest fire handled and dispatch."""

    name: str
    last_fire: datetime | None
    """None: it never fired."""
    last_outcome: str
    """`dispatched` or `skipped` (`none` before the first fire)."""
    last_dispatch_id: int | None
    last_status: DispatchStatus | None
    """The status of `last_dispatch_id` (None when it is gone: retention)."""
