"""The typed store boundary: job verbs that SQLite (now) and PostgreSQL (later) implement.

All timestamps crossing this boundary are timezone-aware UTC `datetime`s; the caller
passes `now` from the injected clock so that tests control time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from dispatcher.models import (
    Attempt,
    AttemptStatus,
    Dispatch,
    DispatchStatus,
    ExpiredDispatches,
    GateRowCounts,
    Instance,
    NewDispatch,
    RecoveryReport,
    Reservation,
    SlotHandle,
    SlotRow,
    Step,
)


class Store(Protocol):
    """Everything the daemon, pipeline, gate and CLI need from the database."""

    shared: bool
    """True when several daemons may use this database at once (PostgreSQL): the gate
    then asks `try_take_slot` before granting a place, and recovery spares live
    instances. False for SQLite (one daemon, an OS lock) and the in-memory store."""

    async def close(self) -> None:
        """Close connections; idempotent."""
        ...

    # -- submission -------------------------------------------------------------------

    async def check_and_reserve(self, new: NewDispatch, now: datetime) -> Reservation:
        """Create a `queued` dispatch, or return the one already holding `new.key`.

        Atomic on the unique key. Same key with the same fingerprint answers the
        existing dispatch with `created=False`; a different fingerprint raises
        `KeyConflict`. Never creates an attempt or a gate row.
        """
        ...

    async def reserve_many(
        self, news: Sequence[NewDispatch], now: datetime
    ) -> list[Reservation | Exception]:
        """`check_and_reserve` for each, in one transaction per call.

        A conflict on one item is answered in its place (a `KeyConflict`) and does not
        abort the others.
        """
        ...

    # -- the dispatch loop --------------------------------------------------------------

    async def claim_next(
        self, instance_id: str, now: datetime, blocked_gates: Collection[str]
    ) -> Dispatch | None:
        """Take the next runnable `queued` dispatch: highest priority, then oldest.

        Skips dispatches whose `not_before` is in the future and those whose `gate_key`
        is in `blocked_gates`. The claimed dispatch becomes `planning` when it has no
        plan yet and `running` when it resumes a stored plan; `instance_id` and
        `started_at` (if unset) are stamped.
        """
        ...

    async def claim_many(
        self, instance_id: str, now: datetime, blocked_gates: Collection[str], limit: int
    ) -> list[Dispatch]:
        """`claim_next` for up to `limit` dispatches in one statement, in claim order.

        Two claimed dispatches may share a per-task gate: the caller checks and
        `requeue`s what it cannot start.
        """
        ...

    async def save_plan(self, dispatch_id: int, plan: Sequence[Step], now: datetime) -> None:
        """Store the plan; the dispatch becomes `running` at step 0.

        `save_plan`, `advance`, `start_attempt`, `finish_attempt` and `finish_dispatch`
        may return once the write is queued: writes keep their order, every later
        statement sees them, and `flush` (or any awaited write) makes them durable.
        """
        ...

    async def advance(self, dispatch_id: int, next_step: int, now: datetime) -> None:
        """Record that every step before `next_step` has succeeded."""
        ...

    async def requeue(
        self, dispatch_id: int, now: datetime, not_before: datetime | None = None
    ) -> None:
        """Return an in-flight dispatch to `queued` (plan and current step kept)."""
        ...

    async def finish_dispatch(
        self, dispatch_id: int, status: DispatchStatus, now: datetime, error: str | None = None
    ) -> None:
        """Stamp a final status (and the reason for a failure)."""
        ...

    async def request_cancel(self, dispatch_id: int, now: datetime) -> Dispatch:
        """Cancel a `queued` dispatch at once; flag an in-flight one for the daemon.

        A dispatch already final is returned unchanged. Raises `NotFound`.
        """
        ...

    async def cancel_requests(self, dispatch_ids: Collection[int]) -> list[int]:
        """Which of these (in-flight) dispatches have a pending cancel request."""
        ...

    # -- attempts -------------------------------------------------------------------------

    async def flush(self) -> None:
        """Return once every write queued before the call is durable."""
        ...

    async def start_attempt(
        self,
        dispatch_id: int,
        step_index: int,
        step: str,
        runner: str,
        attempt: int,
        instance_id: str,
        now: datetime,
    ) -> int:
        """Insert a `running` attempt row and return its id."""
        ...

    async def finish_attempt(
        self,
        attempt_id: int,
        status: AttemptStatus,
        now: datetime,
        *,
        exit_code: int | None = None,
        error: str | None = None,
        output: str | None = None,
    ) -> None:
        """Stamp the attempt's final status; only a `running` attempt is changed."""
        ...

    async def step_attempts(self, dispatch_id: int, step_index: int) -> list[Attempt]:
        """Every attempt of one step, oldest first."""
        ...

    # -- reading ------------------------------------------------------------------------

    async def get_dispatch(self, dispatch_id: int) -> Dispatch | None: ...

    async def list_dispatches(
        self, status: DispatchStatus | None = None, limit: int = 50
    ) -> list[Dispatch]:
        """Newest first."""
        ...

    async def list_attempts(self, dispatch_id: int) -> list[Attempt]:
        """Oldest first."""
        ...

    async def count_by_status(self) -> dict[DispatchStatus, int]: ...

    # -- gate mirror ------------------------------------------------------------------

    async def open_slot(self, gate: str, holder: str, instance_id: str, now: datetime) -> int:
        """Insert a held `gates` row and return its id."""
        ...

    async def close_slot(self, slot_id: int, now: datetime) -> bool:
        """Stamp `released_at` on a held row; False when it was already released."""
        ...

    def mirror_open(self, gate: str, holder: str, instance_id: str, now: datetime) -> SlotHandle:
        """Queue the insert of a held `gates` row without waiting for it.

        Gate rows need no durability before the caller proceeds (recovery at start
        releases every open row); writes keep their order, so a later awaited write
        commits this one.
        """
        ...

    def mirror_close(self, handle: SlotHandle, now: datetime) -> None:
        """Queue the release of a row queued by `mirror_open` (exactly once)."""
        ...

    async def held_slots(self) -> list[SlotRow]:
        """Every row with `released_at` NULL."""
        ...

    async def gate_row_counts(self) -> GateRowCounts: ...

    # -- purge and retention ----------------------------------------------------------

    async def purge_released(self, before: datetime, batch_size: int) -> int:
        """Delete one batch: up to `batch_size` gate rows released before `before`.

        Oldest first, committed on return; a held row is never deleted. Answers how
        many rows went (fewer than `batch_size`: nothing older is left).
        """
        ...

    async def count_purgeable(self, before: datetime) -> int:
        """How many gate rows were released before `before`."""
        ...

    async def purge_finished_dispatches(
        self, before: datetime, batch_size: int
    ) -> ExpiredDispatches:
        """Delete one batch: up to `batch_size` final dispatches finished before `before`.

        Their attempts go with them, in the same transaction; queued and in-flight
        dispatches are never deleted. Their idempotency keys become free again.
        """
        ...

    async def count_expired_dispatches(self, before: datetime) -> ExpiredDispatches:
        """How many final dispatches finished before `before`, and their attempts."""
        ...

    async def reclaim_space(self) -> int:
        """Give one step of free pages back to the file system; answer how many went.

        0 when nothing is free or the backend cannot (SQLite without incremental
        auto-vacuum). Callers loop, yielding between steps, until it answers 0.
        """
        ...

    async def optimize(self) -> None:
        """Refresh the planner's statistics after large changes (cheap when current)."""
        ...

    # -- lifecycle --------------------------------------------------------------------

    async def recover(self, instance_id: str, now: datetime) -> RecoveryReport:
        """Undo what a dead instance left, in one transaction.

        Held gate rows are released and marked recovered; `running` attempts become
        `interrupted`; `planning`/`running` dispatches return to `queued`.
        """
        ...

    async def register_instance(self, instance: Instance) -> None: ...

    async def heartbeat(self, instance_id: str, now: datetime) -> None: ...

    async def stop_instance(self, instance_id: str, now: datetime) -> None: ...

    async def live_instances(self, since: datetime) -> list[Instance]:
        """Instances not stopped whose heartbeat is at or after `since`."""
        ...

    # -- several daemons (issue 8) ------------------------------------------------------

    async def try_take_slot(
        self, gate: str, holder: str, instance_id: str, capacity: int, now: datetime
    ) -> int | None:
        """Insert a held row for `gate` only while fewer than `capacity` rows of that gate
        are held (by any instance), atomically; the row id, or None when full."""
        ...

    async def reap_dead_instances(
        self, instance_id: str, now: datetime, ttl: float
    ) -> RecoveryReport:
        """Recovery for instances other than `instance_id` whose heartbeat is older than
        `ttl` seconds (or that never registered): their held rows released (recovered),
        running attempts interrupted, in-flight dispatches requeued; they are marked
        stopped. Rows of live instances are never touched."""
        ...

    def maintenance_lock(self, name: str) -> AbstractAsyncContextManager[bool]:
        """`async with store.maintenance_lock("purge") as mine:` -- `mine` is True on
        exactly one instance at a time (a PostgreSQL advisory lock); always True where
        only one daemon can run."""
        ...

    async def subscribe(self, on_change: Callable[[], None]) -> None:
        """Call `on_change` when another process inserted a dispatch or released a slot
        (PostgreSQL LISTEN/NOTIFY); a no-op where polling is all there is."""
        ...
