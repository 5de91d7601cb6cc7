"""Test doubles shipped with the package: a fake clock and an in-memory store.

`InMemoryStore` keeps the same semantics as `SQLiteStore` (the contract suite in
`tests/contract` runs against both) and exposes its state as plain dicts of records
(`dispatches`, `attempts`, `slots`, `instances`) for tests to read.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from dispatcher.errors import KeyConflict, NotFound, StoreError
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

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)

CANCELLED_BEFORE_START = "cancelled before it started"

_IN_FLIGHT = frozenset({DispatchStatus.PLANNING, DispatchStatus.RUNNING})


# -- clock ---------------------------------------------------------------------------------


class FakeClock:
    """A `Clock` whose time moves only when a test says so.

    `sleep` returns once `advance` or `set` has moved the time to (or past) its
    target; it never waits on real time.
    """

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        self._now = _utc(start)
        self._changed = asyncio.Event()
        self._sleepers = 0

    def now(self) -> datetime:
        """The fake current time (aware UTC)."""
        return self._now

    def set(self, when: datetime) -> None:
        """Jump to `when` (backwards too) and wake the sleepers to check their targets."""
        self._now = _utc(when)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def advance(self, seconds: float) -> None:
        """Move the time forward by `seconds` and wake the sleepers that are due."""
        if seconds < 0:
            raise ValueError("a fake clock advances forward only; use set() to go back")
        self.set(self._now + timedelta(seconds=seconds))

    @property
    def sleepers(self) -> int:
        """How many `sleep` calls are waiting now."""
        return self._sleepers

    async def sleep(self, seconds: float) -> None:
        """Wait until the fake time reaches now + `seconds` (always yields once)."""
        target = self._now + timedelta(seconds=max(seconds, 0.0))
        await asyncio.sleep(0)
        self._sleepers += 1
        try:
            while self._now < target:
                await self._changed.wait()
        finally:
            self._sleepers -= 1


def _utc(value: datetime) -> datetime:
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: the store takes timezone-aware times")
    return value.astimezone(UTC)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


# -- store ---------------------------------------------------------------------------------


class InMemoryStore:
    """The `Store` protocol in plain Python, for unit tests. Not thread-safe.

    Each method completes without suspending after its first await, so a method is
    as atomic as a transaction of the SQLite store.
    """

    shared = False

    def __init__(self) -> None:
        self.dispatches: dict[int, Dispatch] = {}
        self.attempts: dict[int, Attempt] = {}
        self.slots: dict[int, SlotRow] = {}
        self.instances: dict[str, Instance] = {}
        self.closed = False
        self._keys: dict[str, int] = {}
        self._next_id = {"dispatch": 1, "attempt": 1, "slot": 1}

    async def close(self) -> None:
        """Mark the store closed; idempotent."""
        self.closed = True

    def _new_id(self, kind: str) -> int:
        value = self._next_id[kind]
        self._next_id[kind] = value + 1
        return value

    def _update(self, dispatch: Dispatch, now: datetime, **changes: Any) -> Dispatch:
        updated = dataclasses.replace(dispatch, updated_at=_utc(now), **changes)
        self.dispatches[dispatch.id] = updated
        return updated

    # -- submission -------------------------------------------------------------------

    async def check_and_reserve(self, new: NewDispatch, now: datetime) -> Reservation:
        """Create a `queued` dispatch, or answer the one already holding `new.key`."""
        await asyncio.sleep(0)
        return self._reserve(new, now)

    async def reserve_many(
        self, news: Sequence[NewDispatch], now: datetime
    ) -> list[Reservation | Exception]:
        """Reserve each; a `KeyConflict` is answered in its place."""
        await asyncio.sleep(0)
        answers: list[Reservation | Exception] = []
        for new in news:
            try:
                answers.append(self._reserve(new, now))
            except KeyConflict as exc:
                answers.append(exc)
        return answers

    def _reserve(self, new: NewDispatch, now: datetime) -> Reservation:
        if new.key is not None and new.key in self._keys:
            existing = self.dispatches[self._keys[new.key]]
            if existing.fingerprint != new.fingerprint:
                raise KeyConflict(new.key, existing.id)
            return Reservation(id=existing.id, status=existing.status, created=False)
        dispatch = self._new_dispatch(new, _utc(now))
        self.dispatches[dispatch.id] = dispatch
        if new.key is not None:
            self._keys[new.key] = dispatch.id
        return Reservation(id=dispatch.id, status=dispatch.status, created=True)

    def _new_dispatch(self, new: NewDispatch, now: datetime) -> Dispatch:
        return Dispatch(
            id=self._new_id("dispatch"),
            task=new.task,
            params=dict(new.params),
            key=new.key,
            fingerprint=new.fingerprint,
            priority=new.priority,
            status=DispatchStatus.QUEUED,
            plan=None,
            current_step=0,
            gate_key=new.gate_key,
            not_before=None,
            cancel_requested=False,
            error=None,
            instance_id=None,
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
        )

    # -- the dispatch loop ------------------------------------------------------------

    async def claim_next(
        self, instance_id: str, now: datetime, blocked_gates: Collection[str]
    ) -> Dispatch | None:
        """Take the next runnable `queued` dispatch: highest priority, then oldest."""
        claimed = await self.claim_many(instance_id, now, blocked_gates, 1)
        return claimed[0] if claimed else None

    def _claim(self, chosen: Dispatch, instance_id: str, now: datetime) -> Dispatch:
        status = DispatchStatus.PLANNING if chosen.plan is None else DispatchStatus.RUNNING
        return self._update(
            chosen,
            now,
            status=status,
            instance_id=instance_id,
            started_at=chosen.started_at or now,
            claims=chosen.claims + 1,
        )

    async def claim_many(
        self, instance_id: str, now: datetime, blocked_gates: Collection[str], limit: int
    ) -> list[Dispatch]:
        """Up to `limit` runnable dispatches, in claim order."""
        await asyncio.sleep(0)
        now = _utc(now)
        runnable = [d for d in self.dispatches.values() if _runnable(d, now, blocked_gates)]
        chosen = sorted(runnable, key=lambda d: (-d.priority, d.id))[:limit]
        return [self._claim(d, instance_id, now) for d in chosen]

    async def save_plan(self, dispatch_id: int, plan: Sequence[Step], now: datetime) -> None:
        """Store the plan; the dispatch becomes `running` at step 0."""
        await asyncio.sleep(0)
        if (dispatch := self.dispatches.get(dispatch_id)) is not None:
            self._update(
                dispatch, now, plan=tuple(plan), status=DispatchStatus.RUNNING, current_step=0
            )

    async def advance(self, dispatch_id: int, next_step: int, now: datetime) -> None:
        """Record that every step before `next_step` has succeeded."""
        await asyncio.sleep(0)
        if (dispatch := self.dispatches.get(dispatch_id)) is not None:
            self._update(dispatch, now, current_step=next_step)

    async def requeue(
        self, dispatch_id: int, now: datetime, not_before: datetime | None = None
    ) -> None:
        """Return an in-flight dispatch to `queued` (plan and current step kept)."""
        await asyncio.sleep(0)
        dispatch = self.dispatches.get(dispatch_id)
        if dispatch is not None and dispatch.status in _IN_FLIGHT:
            self._update(
                dispatch,
                now,
                status=DispatchStatus.QUEUED,
                instance_id=None,
                not_before=_utc_or_none(not_before),
            )

    async def finish_dispatch(
        self, dispatch_id: int, status: DispatchStatus, now: datetime, error: str | None = None
    ) -> None:
        """Stamp a final status; a dispatch already final is left alone."""
        if not status.is_final:
            raise ValueError(f"finish_dispatch needs a final status, not {status}")
        await asyncio.sleep(0)
        dispatch = self.dispatches.get(dispatch_id)
        if dispatch is not None and not dispatch.status.is_final:
            self._update(dispatch, now, status=status, error=error, finished_at=_utc(now))

    async def request_cancel(self, dispatch_id: int, now: datetime) -> Dispatch:
        """Cancel a `queued` dispatch at once; flag an in-flight one; raise `NotFound`."""
        await asyncio.sleep(0)
        dispatch = self.dispatches.get(dispatch_id)
        if dispatch is None:
            raise NotFound(f"no dispatch with id {dispatch_id}")
        if dispatch.status is DispatchStatus.QUEUED:
            return self._update(
                dispatch,
                now,
                status=DispatchStatus.CANCELLED,
                finished_at=_utc(now),
                error=CANCELLED_BEFORE_START,
            )
        if dispatch.status in _IN_FLIGHT:
            return self._update(dispatch, now, cancel_requested=True)
        return dispatch

    async def cancel_requests(self, dispatch_ids: Collection[int]) -> list[int]:
        """Which of these dispatches have a pending cancel request (ascending ids)."""
        await asyncio.sleep(0)
        wanted = set(dispatch_ids)
        return sorted(i for i, d in self.dispatches.items() if i in wanted and d.cancel_requested)

    # -- attempts ---------------------------------------------------------------------

    async def flush(self) -> None:
        """Every write here is done when its method returns."""
        await asyncio.sleep(0)

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
        await asyncio.sleep(0)
        if dispatch_id not in self.dispatches:
            raise StoreError(f"start_attempt: no dispatch with id {dispatch_id}")
        row = Attempt(
            id=self._new_id("attempt"),
            dispatch_id=dispatch_id,
            step_index=step_index,
            step=step,
            runner=runner,
            attempt=attempt,
            status=AttemptStatus.RUNNING,
            started_at=_utc(now),
            ended_at=None,
            exit_code=None,
            error=None,
            output=None,
            instance_id=instance_id,
        )
        self.attempts[row.id] = row
        return row.id

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
        if status is AttemptStatus.RUNNING:
            raise ValueError("finish_attempt needs a final status, not running")
        await asyncio.sleep(0)
        row = self.attempts.get(attempt_id)
        if row is None or row.status is not AttemptStatus.RUNNING:
            return
        self.attempts[attempt_id] = dataclasses.replace(
            row, status=status, ended_at=_utc(now), exit_code=exit_code, error=error, output=output
        )

    async def step_attempts(self, dispatch_id: int, step_index: int) -> list[Attempt]:
        """Every attempt of one step, oldest first."""
        await asyncio.sleep(0)
        rows = self._attempts_of(dispatch_id)
        return [row for row in rows if row.step_index == step_index]

    def _attempts_of(self, dispatch_id: int) -> list[Attempt]:
        rows = (row for row in self.attempts.values() if row.dispatch_id == dispatch_id)
        return sorted(rows, key=lambda row: row.id)

    # -- reading ----------------------------------------------------------------------

    async def get_dispatch(self, dispatch_id: int) -> Dispatch | None:
        """One dispatch, or None."""
        await asyncio.sleep(0)
        return self.dispatches.get(dispatch_id)

    async def list_dispatches(
        self, status: DispatchStatus | None = None, limit: int = 50
    ) -> list[Dispatch]:
        """Newest first."""
        await asyncio.sleep(0)
        rows = [d for d in self.dispatches.values() if status is None or d.status is status]
        return sorted(rows, key=lambda d: d.id, reverse=True)[: max(limit, 0)]

    async def list_attempts(self, dispatch_id: int) -> list[Attempt]:
        """Oldest first."""
        await asyncio.sleep(0)
        return self._attempts_of(dispatch_id)

    async def count_by_status(self) -> dict[DispatchStatus, int]:
        """Dispatches per status; every status is present (0 when none)."""
        await asyncio.sleep(0)
        counts = dict.fromkeys(DispatchStatus, 0)
        for dispatch in self.dispatches.values():
            counts[dispatch.status] += 1
        return counts

    # -- gate mirror ------------------------------------------------------------------

    async def open_slot(self, gate: str, holder: str, instance_id: str, now: datetime) -> int:
        """Insert a held slot row and return its id."""
        await asyncio.sleep(0)
        return self._insert_slot(gate, holder, instance_id, now)

    async def close_slot(self, slot_id: int, now: datetime) -> bool:
        """Stamp `released_at` on a held row; False when it was already released."""
        await asyncio.sleep(0)
        return self._release_slot(slot_id, now)

    def mirror_open(self, gate: str, holder: str, instance_id: str, now: datetime) -> SlotHandle:
        """Insert a held slot row at once (nothing to queue in memory)."""
        return SlotHandle(gate, holder, self._insert_slot(gate, holder, instance_id, now))

    def _insert_slot(self, gate: str, holder: str, instance_id: str, now: datetime) -> int:
        row = SlotRow(
            id=self._new_id("slot"),
            gate=gate,
            holder=holder,
            instance_id=instance_id,
            acquired_at=_utc(now),
            released_at=None,
            recovered=False,
        )
        self.slots[row.id] = row
        return row.id

    def _release_slot(self, slot_id: int, now: datetime) -> bool:
        row = self.slots.get(slot_id)
        if row is None or row.released_at is not None:
            return False
        self.slots[slot_id] = dataclasses.replace(row, released_at=_utc(now))
        return True

    def mirror_close(self, handle: SlotHandle, now: datetime) -> None:
        """Release the row, exactly once."""
        if handle.row_id is not None:
            self._release_slot(handle.row_id, now)

    async def held_slots(self) -> list[SlotRow]:
        """Every row with `released_at` None, oldest first."""
        await asyncio.sleep(0)
        return [row for _, row in sorted(self.slots.items()) if row.released_at is None]

    async def gate_row_counts(self) -> GateRowCounts:
        """How many slot rows are held and how many released."""
        await asyncio.sleep(0)
        held = sum(1 for row in self.slots.values() if row.released_at is None)
        return GateRowCounts(held=held, released=len(self.slots) - held)

    # -- purge and retention ----------------------------------------------------------

    async def purge_released(self, before: datetime, batch_size: int) -> int:
        """Delete up to `batch_size` slot rows released before `before`, oldest first."""
        await asyncio.sleep(0)
        expired = sorted(self._released_before(_utc(before)), key=_released_order)
        for row in expired[:batch_size]:
            del self.slots[row.id]
        return min(len(expired), batch_size)

    async def count_purgeable(self, before: datetime) -> int:
        """How many slot rows were released before `before`."""
        await asyncio.sleep(0)
        return sum(1 for _ in self._released_before(_utc(before)))

    def _released_before(self, before: datetime) -> list[SlotRow]:
        return [
            row
            for row in self.slots.values()
            if row.released_at is not None and row.released_at < before
        ]

    async def purge_finished_dispatches(
        self, before: datetime, batch_size: int
    ) -> ExpiredDispatches:
        """Delete up to `batch_size` final dispatches finished before `before`, with attempts."""
        await asyncio.sleep(0)
        batch = self._expired(_utc(before))[:batch_size]
        ids = {d.id for d in batch}
        attempts = [a.id for a in self.attempts.values() if a.dispatch_id in ids]
        for attempt_id in attempts:
            del self.attempts[attempt_id]
        for dispatch in batch:
            del self.dispatches[dispatch.id]
            if dispatch.key is not None:
                del self._keys[dispatch.key]
        return ExpiredDispatches(dispatches=len(batch), attempts=len(attempts))

    async def count_expired_dispatches(self, before: datetime) -> ExpiredDispatches:
        """How many final dispatches finished before `before`, and their attempts."""
        await asyncio.sleep(0)
        ids = {d.id for d in self._expired(_utc(before))}
        attempts = sum(1 for a in self.attempts.values() if a.dispatch_id in ids)
        return ExpiredDispatches(dispatches=len(ids), attempts=attempts)

    def _expired(self, before: datetime) -> list[Dispatch]:
        expired = [
            d
            for d in self.dispatches.values()
            if d.status.is_final and d.finished_at is not None and d.finished_at < before
        ]
        return sorted(expired, key=lambda d: (d.finished_at, d.id))

    async def reclaim_space(self) -> int:
        """Nothing to give back in memory."""
        await asyncio.sleep(0)
        return 0

    async def optimize(self) -> None:
        """Nothing to optimize in memory."""
        await asyncio.sleep(0)

    # -- lifecycle --------------------------------------------------------------------

    async def recover(self, instance_id: str, now: datetime) -> RecoveryReport:
        """Undo what instances other than `instance_id` left open."""
        await asyncio.sleep(0)
        now = _utc(now)
        return RecoveryReport(
            slots_released=self._recover_slots(instance_id, now),
            attempts_interrupted=self._recover_attempts(instance_id, now),
            dispatches_requeued=self._recover_dispatches(instance_id, now),
        )

    def _recover_slots(self, instance_id: str, now: datetime) -> int:
        stale = [
            row
            for row in self.slots.values()
            if row.released_at is None and row.instance_id != instance_id
        ]
        for row in stale:
            self.slots[row.id] = dataclasses.replace(row, released_at=now, recovered=True)
        return len(stale)

    def _recover_attempts(self, instance_id: str, now: datetime) -> int:
        stale = [
            row
            for row in self.attempts.values()
            if row.status is AttemptStatus.RUNNING and row.instance_id != instance_id
        ]
        for row in stale:
            self.attempts[row.id] = dataclasses.replace(
                row, status=AttemptStatus.INTERRUPTED, ended_at=now
            )
        return len(stale)

    def _recover_dispatches(self, instance_id: str, now: datetime) -> int:
        stale = [
            d
            for d in self.dispatches.values()
            if d.status in _IN_FLIGHT and d.instance_id != instance_id
        ]
        for dispatch in stale:
            self._update(dispatch, now, status=DispatchStatus.QUEUED, instance_id=None)
        return len(stale)

    async def register_instance(self, instance: Instance) -> None:
        """Add the record of a starting daemon."""
        await asyncio.sleep(0)
        if instance.id in self.instances:
            raise StoreError(f"instance {instance.id!r} is already registered")
        self.instances[instance.id] = dataclasses.replace(
            instance,
            started_at=_utc(instance.started_at),
            heartbeat_at=_utc(instance.heartbeat_at),
            stopped_at=_utc_or_none(instance.stopped_at),
        )

    async def heartbeat(self, instance_id: str, now: datetime) -> None:
        """Stamp `heartbeat_at`."""
        await asyncio.sleep(0)
        if (row := self.instances.get(instance_id)) is not None:
            self.instances[instance_id] = dataclasses.replace(row, heartbeat_at=_utc(now))

    async def stop_instance(self, instance_id: str, now: datetime) -> None:
        """Stamp `stopped_at` (once)."""
        await asyncio.sleep(0)
        row = self.instances.get(instance_id)
        if row is not None and row.stopped_at is None:
            self.instances[instance_id] = dataclasses.replace(row, stopped_at=_utc(now))

    async def live_instances(self, since: datetime) -> list[Instance]:
        """Instances not stopped whose heartbeat is at or after `since`."""
        await asyncio.sleep(0)
        since = _utc(since)
        rows = [
            i for i in self.instances.values() if i.stopped_at is None and i.heartbeat_at >= since
        ]
        return sorted(rows, key=lambda i: (i.started_at, i.id))

    # -- several daemons (issue 8) ----------------------------------------------------

    async def try_take_slot(
        self, gate: str, holder: str, instance_id: str, capacity: int, now: datetime
    ) -> int | None:
        """Insert a held row only while fewer than `capacity` of `gate` are held."""
        await asyncio.sleep(0)
        held = sum(1 for r in self.slots.values() if r.gate == gate and r.released_at is None)
        if held >= capacity:
            return None
        return await self.open_slot(gate, holder, instance_id, now)

    async def reap_dead_instances(
        self, instance_id: str, now: datetime, ttl: float
    ) -> RecoveryReport:
        """Recovery for instances other than `instance_id` silent for over `ttl` seconds."""
        await asyncio.sleep(0)
        now = _utc(now)
        since = now - timedelta(seconds=ttl)
        live = {i.id for i in self.instances.values() if i.stopped_at is None}
        live = {i for i in live if self.instances[i].heartbeat_at >= since} | {instance_id}
        report = RecoveryReport(
            slots_released=self._reap_slots(live, now),
            attempts_interrupted=self._reap_attempts(live, now),
            dispatches_requeued=self._reap_dispatches(live, now),
        )
        for row in list(self.instances.values()):
            if row.id not in live and row.stopped_at is None:
                self.instances[row.id] = dataclasses.replace(row, stopped_at=now)
        return report

    def _reap_slots(self, live: set[str], now: datetime) -> int:
        dead = [r for r in self.slots.values() if r.released_at is None]
        dead = [r for r in dead if r.instance_id not in live]
        for row in dead:
            self.slots[row.id] = dataclasses.replace(row, released_at=now, recovered=True)
        return len(dead)

    def _reap_attempts(self, live: set[str], now: datetime) -> int:
        dead = [r for r in self.attempts.values() if r.status is AttemptStatus.RUNNING]
        dead = [r for r in dead if r.instance_id not in live]
        for row in dead:
            self.attempts[row.id] = dataclasses.replace(
                row, status=AttemptStatus.INTERRUPTED, ended_at=now
            )
        return len(dead)

    def _reap_dispatches(self, live: set[str], now: datetime) -> int:
        dead = [d for d in self.dispatches.values() if d.status in _IN_FLIGHT]
        dead = [d for d in dead if d.instance_id not in live]
        for dispatch in dead:
            self._update(dispatch, now, status=DispatchStatus.QUEUED, instance_id=None)
        return len(dead)

    @asynccontextmanager
    async def maintenance_lock(self, name: str) -> AsyncIterator[bool]:
        """Always granted: one process, one instance."""
        yield True

    async def subscribe(self, on_change: Callable[[], None]) -> None:
        """Nothing to listen to in memory."""


def _released_order(row: SlotRow) -> tuple[datetime, int]:
    assert row.released_at is not None
    return row.released_at, row.id


def _runnable(dispatch: Dispatch, now: datetime, blocked_gates: Collection[str]) -> bool:
    return (
        dispatch.status is DispatchStatus.QUEUED
        and (dispatch.not_before is None or dispatch.not_before <= now)
        and (dispatch.gate_key is None or dispatch.gate_key not in blocked_gates)
    )
