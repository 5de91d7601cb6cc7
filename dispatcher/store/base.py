"""The store: one abstract base that owns every verb, and a few primitives per backend.

The daemon, pipeline, gate and CLI speak in job verbs (`claim_many`, `finish_attempt`,
`mirror_close`, `heartbeat`, `purge_released`). This base turns each verb into named
statements, once for every backend: validation, claim ordering, the reserve loop,
status counts, recovery reports, row mapping and migration loading live here. A
backend supplies the primitives at the bottom of the class: run one named statement,
open a transaction, write a batch, hand out row ids, and how it spells times and lists.
Its statements live in `.sql` files of named blocks (`sql/common.sql` for what both
SQL dialects share, plus one file per backend); the in-memory fake of
`dispatcher.testing` implements the same names in Python.

Writes whose caller need not wait (attempt rows, plan and step progress, final
statuses, gate mirror rows) are queued in a `WriteBuffer` and written in batches, one
transaction each; `flush()` waits for them. Every other statement first lets the
queued writes land, so it sees them (the claim alone goes ahead: no queued write
touches a queued dispatch).

All timestamps crossing this boundary are timezone-aware UTC `datetime`s; the caller
passes `now` from the injected clock so that tests control time.
"""

from __future__ import annotations

import dataclasses
import json
import re
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from importlib import resources
from typing import Any, ClassVar, Protocol

from dispatcher import logs
from dispatcher.errors import (
    DatabaseCorrupt,
    KeyConflict,
    LeaseLost,
    NotFound,
    NotRetryable,
    SchemaBehind,
    StoreError,
)
from dispatcher.models import (
    Attempt,
    AttemptStatus,
    Dispatch,
    DispatchStatus,
    ExpiredDispatches,
    Fired,
    FireOutcome,
    GateRowCounts,
    Instance,
    NewDispatch,
    Overlap,
    RecoveryReport,
    Reservation,
    ScheduleState,
    SlotRow,
    Step,
)
from dispatcher.store.writes import Fold, Params, WriteBatch, WriteBuffer

log = logs.get_logger("dispatcher.store")


class Row(Protocol):
    """A result row: a column by name (sqlite3.Row, asyncpg.Record, a dict)."""

    def __getitem__(self, key: str, /) -> Any: ...


CANCELLED_BEFORE_START = "cancelled before it started"

NEVER_FIRED = datetime(1970, 1, 1, tzinfo=UTC)
"""`schedules.last_fire` of a schedule that has handled no fire yet."""

_UNFINISHED = frozenset({"queued", "planning", "running"})

RETRYABLE = frozenset({DispatchStatus.FAILED, DispatchStatus.CANCELLED})
"""The statuses `retry` (and `key_reuse = "after_failure"`) start again from."""

FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
"""`since` for recovery where one daemon owns the database: nobody else is alive."""

CLOSE_PATIENCE = 10.0
"""How long `close` keeps trying to write what is queued while the database is down."""

_PROGRESS = {"plan": None, "current_step": None, "status": None, "final": False, "error": None}
"""Fields of a `write_progress` that a verb did not set: left as they are in the row."""


class Access(Enum):
    """How a command opens the database."""

    CREATE = "create"
    """`run` and `init`: create the database (SQLite: the file and its folder) if
    missing, and migrate it forward."""
    WRITE = "write"
    """Commands that write: the database must exist; migrate it forward."""
    READ = "read"
    """Commands that only read: no write of any kind, not even a lock or a migration,
    so they work on a read-only file and while another process holds the write lock."""


@dataclass(frozen=True, slots=True)
class GrantedClaim:
    """What `claim_with_slots` took: each claimed dispatch with the id of its held gate
    row (claim order), and the room the gate had (places free across every instance,
    before this claim took its own)."""

    claimed: list[tuple[Dispatch, int]]
    room: int


class Tx(Protocol):
    """Statements inside one open transaction."""

    async def fetch(self, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        """Run one named statement; answer its rows."""
        ...


# -- migrations --------------------------------------------------------------------------

_MIGRATION_NAME = re.compile(r"^(?P<version>\d+)_\w+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered file of a backend's `migrations/` folder."""

    version: int
    name: str
    sql: str


def load_migrations(package: str) -> tuple[Migration, ...]:
    """Every migration of `package`'s `migrations/` folder, in version order."""
    folder = resources.files(package).joinpath("migrations")
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        version = int(match["version"])
        if version in found:
            raise StoreError(f"two migrations share version {version}: {entry.name}")
        found[version] = Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    return tuple(found[version] for version in sorted(found))


def as_sent(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """`params` with each function among them replaced by what it answers now (see
    `Store._execute`); a limit asked so is never below 0."""
    if not any(callable(value) for value in params.values()):
        return params
    return {key: max(value(), 0) if callable(value) else value for key, value in params.items()}


# -- the store ---------------------------------------------------------------------------


class Store(ABC):
    """Everything the daemon, pipeline, gate and CLI need from the database."""

    shared: ClassVar[bool] = False
    """True when several daemons may use this database at once (PostgreSQL): the gate
    then asks `try_take_slot` before granting a place, and recovery spares live
    instances. False for SQLite (one daemon, an OS lock) and the in-memory store."""

    migrations: ClassVar[str | None] = None
    """The package whose `migrations/` folder holds this backend's schema."""

    instance_ttl: float = 30.0
    """Seconds a silent instance still counts as alive (shared stores)."""

    def __init__(self, database: str) -> None:
        self.database = database
        """Where the data lives, for messages (a path, or a URL without its password)."""
        self.on_fatal: Callable[[DatabaseCorrupt], None] | None = None
        """Told once when the database turns out damaged (the daemon stops)."""
        self._writes = WriteBuffer(
            self._write_fenced,
            database,
            on_fatal=self._corrupt,
            on_available=self._available,
            on_lease_lost=self._lease_lost,
        )
        self.on_available: Callable[[], None] | None = None
        """Told when queued writes land again after an outage."""
        self.lease: str | None = None
        """The instance whose lease fences the writes about work it owns (set by the
        daemon once registered; None for the CLI). On a shared store a write under a
        lease that another daemon took is refused: `LeaseLost`."""
        self.on_lease_lost: Callable[[LeaseLost], None] | None = None
        """Told when a write or a heartbeat finds the lease taken."""
        self._ids: dict[str, Iterator[int]] = {}
        self._closed = False
        self._corrupt_seen = False

    async def close(self) -> None:
        """Write what is queued (trying for a while if the database is down), then close
        connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._writes.close(CLOSE_PATIENCE)
        finally:
            await self._close()

    # -- submission -------------------------------------------------------------------

    async def check_and_reserve(self, new: NewDispatch, now: datetime) -> Reservation:
        """Create a `queued` dispatch, or return the one already holding `new.key`.

        Atomic on the unique key. Same key with the same fingerprint answers the
        existing dispatch with `created=False`; a different fingerprint raises
        `KeyConflict`. Never creates an attempt or a gate row.
        """
        async with self._tx() as tx:
            reservation = await self._reserve(tx, new, now)
        if reservation.created or reservation.retried:
            self._submitted()
        return reservation

    async def reserve_many(
        self, news: Sequence[NewDispatch], now: datetime
    ) -> list[Reservation | Exception]:
        """`check_and_reserve` for each, in one transaction per call.

        A conflict on one item is answered in its place (a `KeyConflict`) and does not
        abort the others.
        """
        answers: list[Reservation | Exception] = []
        if not news:
            return answers
        async with self._tx() as tx:
            for new in news:
                try:
                    answers.append(await self._reserve(tx, new, now))
                except KeyConflict as exc:
                    answers.append(exc)
        if any(
            isinstance(answer, Reservation) and (answer.created or answer.retried)
            for answer in answers
        ):
            self._submitted()
        return answers

    async def _reserve(self, tx: Tx, new: NewDispatch, now: datetime) -> Reservation:
        """Insert unless the key is taken; a taken key must carry the same fingerprint.

        With `new.retry_failed`, a failed or cancelled dispatch holding the key is queued
        again (as `retry` does) instead of answered as it is.
        """
        params = {
            "task": new.task,
            "params": json.dumps(new.params, separators=(",", ":")),
            "key": new.key,
            "fingerprint": new.fingerprint,
            "priority": new.priority,
            "gate_key": new.gate_key,
            "not_before": None if new.not_before is None else self._time(new.not_before),
            "follows": new.follows,
            "now": self._time(now),
        }
        rows = await tx.fetch("insert_dispatch", params)
        if rows:
            status = DispatchStatus(rows[0]["status"])
            return Reservation(rows[0]["id"], status, created=True, not_before=new.not_before)
        assert new.key is not None, "only a keyed insert can conflict"
        existing = (await tx.fetch("dispatch_by_key", {"key": new.key}))[0]
        if existing["fingerprint"] != new.fingerprint:
            raise KeyConflict(new.key, existing["id"])
        status = DispatchStatus(existing["status"])
        if new.retry_failed and status in RETRYABLE:
            retried = await tx.fetch("retry_dispatch", {"id": existing["id"], "now": params["now"]})
            if retried:
                return Reservation(existing["id"], DispatchStatus.QUEUED, False, retried=True)
        return Reservation(existing["id"], status, created=False)

    # -- later and again ---------------------------------------------------------------

    async def retry(self, dispatch_id: int, now: datetime) -> Dispatch:
        """Queue a failed or cancelled dispatch again from its first unfinished step.

        The steps that succeeded stay done (their attempts and results are kept), the
        plan is kept, and the claim count goes on (a resumed dispatch reads its history);
        `series` grows by one, so the attempts of the new series are counted anew
        against each step's retries. Raises `NotFound`, or `NotRetryable` for a dispatch
        that is not failed or cancelled.
        """
        params = {"id": dispatch_id, "now": self._time(now)}
        async with self._tx() as tx:
            rows = await tx.fetch("retry_dispatch", params)
            retried = bool(rows)
            if not retried:
                rows = await tx.fetch("get_dispatch", {"id": dispatch_id})
        if not rows:
            raise NotFound(f"no dispatch with id {dispatch_id}")
        dispatch = self.dispatch_from_row(rows[0])
        if not retried:
            raise NotRetryable(
                f"dispatch {dispatch_id} is {dispatch.status}: only a failed or cancelled "
                "dispatch can be retried"
            )
        self._submitted()
        return dispatch

    async def fire_schedule(
        self, schedule: str, fire_at: datetime, new: NewDispatch, overlap: Overlap, now: datetime
    ) -> Fired:
        """One fire of a schedule, exactly once: in one transaction, serialized with every
        other fire of the schedule (by any daemon), its row says whether the fire was
        handled already; if not, the overlap policy decides against the schedule's
        previous dispatch, and the dispatch `new` (keyed by the fire) is reserved.

        The row then records the fire, so a restart or another daemon never handles
        it (or an earlier one) again; the key makes the dispatch unique even so.
        """
        at = self._time(now)
        async with self._tx() as tx:
            ensure = {"name": schedule, "never": self._time(NEVER_FIRED), "now": at}
            await tx.fetch("schedule_ensure", ensure)
            state = (await tx.fetch("schedule_for_update", {"name": schedule}))[0]
            if self._from_time(state["last_fire"]) >= fire_at:
                return Fired(FireOutcome.SEEN, state["last_dispatch_id"])
            previous = state["last_dispatch_id"]
            unfinished = False
            if previous is not None and overlap != "allow":
                # Read after the lock: a statement of its own sees what the daemon that
                # held the lock before committed (PostgreSQL, READ COMMITTED).
                rows = await tx.fetch("get_dispatch", {"id": previous})
                unfinished = bool(rows) and rows[0]["status"] in _UNFINISHED
            record = {"name": schedule, "fire": self._time(fire_at), "now": at}
            if unfinished and overlap == "skip":
                await tx.fetch(
                    "schedule_record", {**record, "outcome": "skipped", "dispatch_id": None}
                )
                return Fired(FireOutcome.SKIPPED, previous)
            if unfinished and overlap == "queue":
                new = dataclasses.replace(new, follows=previous)
            try:
                reservation = await self._reserve(tx, new, now)
            except KeyConflict as exc:  # dispatched before with other params: it stands
                reservation = Reservation(exc.existing_id, DispatchStatus.QUEUED, created=False)
            outcome = {"outcome": "dispatched", "dispatch_id": reservation.id}
            await tx.fetch("schedule_record", {**record, **outcome})
        if reservation.created:
            self._submitted()
            return Fired(FireOutcome.DISPATCHED, reservation.id)
        return Fired(FireOutcome.EXISTING, reservation.id)

    async def schedule_states(self) -> dict[str, ScheduleState]:
        """Every schedule that ever fired, by name."""
        states = {}
        for row in await self._fetch("schedule_states"):
            last_fire = self._from_time(row["last_fire"])
            status = row["last_status"]
            states[row["name"]] = ScheduleState(
                name=row["name"],
                last_fire=None if last_fire <= NEVER_FIRED else last_fire,
                last_outcome=row["last_outcome"],
                last_dispatch_id=row["last_dispatch_id"],
                last_status=None if status is None else DispatchStatus(status),
            )
        return states

    async def next_due(self, now: datetime) -> datetime | None:
        """The earliest `not_before` after `now` of a queued dispatch (None: none waits)."""
        rows = await self._fetch("next_due", {"now": self._time(now)})
        return self._time_or_none(rows[0]["due"]) if rows else None

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
        claimed = await self.claim_many(instance_id, now, blocked_gates, 1)
        return claimed[0] if claimed else None

    async def claim_many(
        self,
        instance_id: str,
        now: datetime,
        blocked_gates: Collection[str],
        limit: int | Callable[[], int],
    ) -> list[Dispatch]:
        """`claim_next` for up to `limit` dispatches in one statement, in claim order.

        `limit` may be a function: it is asked once the statement is about to go out,
        after any wait for the connection (a claim that waited behind a batch of
        writes then takes the places freed meanwhile too, instead of leaving them to a
        claim of their own).

        Two claimed dispatches may share a per-task gate: the caller checks and
        `requeue`s what it cannot start. The claim runs ahead of the queued writes:
        none of them touches a queued dispatch, and the loop has nothing to run until
        it returns.
        """
        params = {
            "instance_id": instance_id,
            "now": self._time(now),
            "blocked_gates": self._list(sorted(blocked_gates)),
            "limit": limit if callable(limit) else max(limit, 0),
            "fence": self.lease,
        }
        rows = await self._fetch("claim_many", params, first=True)
        claimed = [self.dispatch_from_row(row) for row in rows]
        claimed.sort(key=lambda d: (-d.priority, d.id))
        return claimed

    async def claim_with_slots(
        self,
        instance_id: str,
        now: datetime,
        blocked_gates: Collection[str],
        limit: int,
        gate: str,
        capacity: int,
    ) -> GrantedClaim:
        """`claim_many`, each claimed dispatch with a held row of `gate` (holder
        `dispatch:ID`), never beyond `capacity` held rows of that gate across every
        instance: the claim and the places of a shared gate in one go.

        Rows this store has released but not yet written count as free (the place is
        given back; the write is on its way), so a backend may run the claim ahead of
        the queued writes, as `claim_many` does. A claimer whose lease was taken claims
        nothing.
        """
        slot_ids = [await self._next_id("gates") for _ in range(max(limit, 0))]
        params = {
            "instance_id": instance_id,
            "now": self._time(now),
            "blocked_gates": self._list(sorted(blocked_gates)),
            "limit": max(limit, 0),
            "fence": self.lease,
            "gate": gate,
            "capacity": capacity,
            "slot_ids": self._list(slot_ids),
            "released": self._list(self._writes.queued_keys("release_slot")),
        }
        granted = await self._claim_with_slots(params, slot_ids)
        granted.claimed.sort(key=lambda pair: (-pair[0].priority, pair[0].id))
        return granted

    async def _claim_with_slots(
        self, params: Mapping[str, Any], slot_ids: Sequence[int]
    ) -> GrantedClaim:
        """`claim_with_slots` as a transaction of the verbs' own statements (a backend
        may do it in one statement instead)."""
        async with self._tx() as tx:
            if self.shared and self.lease is not None:
                if not await tx.fetch("lease_check", {"instance_id": self.lease}):
                    return GrantedClaim([], 0)
            if self.shared:
                await tx.fetch("gate_lock", {"gate": params["gate"]})
            held: int = (await tx.fetch("gate_held_count", {"gate": params["gate"]}))[0]["n"]
            room = max(params["capacity"] - held, 0)
            rows = await tx.fetch("claim_many", {**params, "limit": min(params["limit"], room)})
            claimed: list[tuple[Dispatch, int]] = []
            ids = sorted(row["id"] for row in rows)
            by_id = {row["id"]: row for row in rows}
            for dispatch_id, slot_id in zip(ids, slot_ids, strict=False):
                holder = f"dispatch:{dispatch_id}"
                slot = {
                    "id": slot_id,
                    "gate": params["gate"],
                    "holder": holder,
                    "instance_id": params["instance_id"],
                    "now": params["now"],
                    "released_at": None,
                }
                await tx.fetch("insert_slot", slot)
                claimed.append((self.dispatch_from_row(by_id[dispatch_id]), slot_id))
        return GrantedClaim(claimed, room)

    async def save_plan(self, dispatch_id: int, plan: Sequence[Step], now: datetime) -> None:
        """Store the plan; the dispatch becomes `running` at step 0.

        `save_plan`, `advance`, `start_attempt`, `finish_attempt` and `finish_dispatch`
        return once the write is queued: writes keep their order, every later
        statement sees them, and `flush` (or any awaited statement) makes them durable.
        """
        plan_json = json.dumps([step.to_json() for step in plan], separators=(",", ":"))
        self._progress(dispatch_id, now, plan=plan_json, current_step=0, status="running")

    async def advance(self, dispatch_id: int, next_step: int, now: datetime) -> None:
        """Record that every step before `next_step` has succeeded."""
        self._progress(dispatch_id, now, current_step=next_step)

    def finish_dispatch(
        self, dispatch_id: int, status: DispatchStatus, now: datetime, error: str | None = None
    ) -> None:
        """Stamp a final status (and the reason for a failure); a final dispatch stays.

        Queued, and a plain method: it never waits, so no cancellation can cut it off."""
        if not status.is_final:
            raise ValueError(f"finish_dispatch needs a final status, not {status}")
        self._progress(dispatch_id, now, status=str(status), final=True, error=error)

    def _progress(self, dispatch_id: int, now: datetime, **fields: Any) -> None:
        """Queue a change of the dispatch row, merged into one still queued for it."""
        fields["now"] = self._time(now)
        queued = self._pending("write_progress", dispatch_id)
        if queued is None:
            first = {"id": dispatch_id, "instance_id": self.lease, **_PROGRESS, **fields}
            self._queue("write_progress", dispatch_id, first)
        elif not queued["final"]:  # once final, the row takes no further change
            queued.update(fields)

    async def requeue(
        self, dispatch_id: int, now: datetime, not_before: datetime | None = None
    ) -> None:
        """Return an in-flight dispatch to `queued` (plan and current step kept)."""
        params = {
            "id": dispatch_id,
            "now": self._time(now),
            "not_before": None if not_before is None else self._time(not_before),
            "instance_id": self.lease,
        }
        await self._fetch("requeue", params)

    async def requeue_abandoned(
        self, instance_id: str, keep: Collection[int], now: datetime
    ) -> list[int]:
        """Put back to `queued` what `instance_id` marked in flight but does not run
        (every dispatch of it planning or running whose id is not in `keep`).

        Runs after every write queued before the call, so a dispatch that finished
        before the caller took `keep` is final by then and stays as it is.
        """
        params = {
            "instance_id": instance_id,
            "keep": self._list(sorted(keep)),
            "now": self._time(now),
        }
        return sorted(row["id"] for row in await self._fetch("requeue_abandoned", params))

    async def request_cancel(self, dispatch_id: int, now: datetime) -> Dispatch:
        """Cancel a `queued` dispatch at once; flag an in-flight one for the daemon.

        A dispatch already final is returned unchanged. Raises `NotFound`.
        """
        params = {"id": dispatch_id, "now": self._time(now), "error": CANCELLED_BEFORE_START}
        async with self._tx() as tx:
            rows = await tx.fetch("request_cancel", params)
            if not rows:
                rows = await tx.fetch("get_dispatch", {"id": dispatch_id})
        if not rows:
            raise NotFound(f"no dispatch with id {dispatch_id}")
        dispatch = self.dispatch_from_row(rows[0])
        if dispatch.cancel_requested:
            self._submitted()  # it is in flight: the daemon stops it at once
        return dispatch

    async def cancel_requests(self, dispatch_ids: Collection[int]) -> list[int]:
        """Which of these (in-flight) dispatches have a pending cancel request."""
        if not dispatch_ids:
            return []
        rows = await self._fetch("cancel_requests", {"ids": self._list(sorted(dispatch_ids))})
        return sorted(row["id"] for row in rows)

    # -- attempts -------------------------------------------------------------------------

    @property
    def writes_queued(self) -> bool:
        """Whether writes are queued or being written (not durable yet)."""
        return not self._writes.idle

    async def flush(self) -> None:
        """Return once every write queued before the call is durable."""
        self._check_open()
        await self._writes.flush()

    async def start_attempt(
        self,
        dispatch_id: int,
        step_index: int,
        step: str,
        runner: str,
        attempt: int,
        instance_id: str,
        now: datetime,
        series: int = 0,
        *,
        durable: bool = False,
    ) -> int:
        """Queue the insert of a `running` attempt row and return its id (`series`: the
        dispatch's, see `retry`).

        `durable`: return only once the row (and every write queued before it) has
        landed, however long the database is away; raise what refused it (a
        constraint: `StoreError`; the lease fence: `LeaseLost`). A step whose runner
        has effects must not start before its row exists.
        """
        attempt_id = await self._next_id("attempts")
        row = {
            "id": attempt_id,
            "dispatch_id": dispatch_id,
            "step_index": step_index,
            "step": step,
            "runner": runner,
            "attempt": attempt,
            "status": str(AttemptStatus.RUNNING),
            "started_at": self._time(now),
            "ended_at": None,
            "exit_code": None,
            "error": None,
            "output": None,
            "instance_id": instance_id,
            "result": None,
            "series": series,
        }
        self._queue("insert_attempt", attempt_id, row)
        if durable:
            await self._landed("insert_attempt", attempt_id)
        return attempt_id

    def finish_attempt(
        self,
        attempt_id: int,
        status: AttemptStatus,
        now: datetime,
        *,
        exit_code: int | None = None,
        error: str | None = None,
        output: str | None = None,
        result: str | None = None,
    ) -> None:
        """Stamp the attempt's final status; only a `running` attempt is changed.
        Queued, and a plain method: it never waits, so no cancellation can cut it off.

        `result`: what the step gave back, as JSON text (the runner bounds its size).
        """
        if status is AttemptStatus.RUNNING:
            raise ValueError("finish_attempt needs a final status, not running")
        end = {
            "status": str(status),
            "ended_at": self._time(now),
            "exit_code": exit_code,
            "error": error,
            "output": output,
            "result": result,
        }
        insert = self._pending("insert_attempt", attempt_id)
        if insert is not None:  # not written yet: one row, complete (the first end wins)
            if insert["status"] == AttemptStatus.RUNNING:
                insert.update(end)
            return
        self._queue("finish_attempt", attempt_id, {"id": attempt_id, **end}, fold="first")

    async def step_attempts(self, dispatch_id: int, step_index: int) -> list[Attempt]:
        """Every attempt of one step, oldest first."""
        params = {"dispatch_id": dispatch_id, "step_index": step_index}
        return self._attempts(await self._fetch("step_attempts", params))

    # -- reading ------------------------------------------------------------------------

    async def get_dispatch(self, dispatch_id: int) -> Dispatch | None:
        """One dispatch, or None."""
        rows = await self._fetch("get_dispatch", {"id": dispatch_id})
        return self.dispatch_from_row(rows[0]) if rows else None

    async def list_dispatches(
        self, status: DispatchStatus | None = None, limit: int = 50
    ) -> list[Dispatch]:
        """Newest first."""
        params: dict[str, Any] = {"limit": max(limit, 0)}
        if status is None:
            rows = await self._fetch("list_dispatches", params)
        else:
            rows = await self._fetch("list_dispatches_by_status", {**params, "status": str(status)})
        return [self.dispatch_from_row(row) for row in rows]

    async def list_attempts(self, dispatch_id: int) -> list[Attempt]:
        """Oldest first."""
        return self._attempts(await self._fetch("list_attempts", {"dispatch_id": dispatch_id}))

    async def count_by_status(self) -> dict[DispatchStatus, int]:
        """Dispatches per status; every status is present (0 when none)."""
        counts = dict.fromkeys(DispatchStatus, 0)
        for row in await self._fetch("count_by_status"):
            counts[DispatchStatus(row["status"])] = row["n"]
        return counts

    # -- gate mirror ------------------------------------------------------------------

    async def open_slot(self, gate: str, holder: str, instance_id: str, now: datetime) -> int:
        """Insert a held `gates` row and return its id."""
        slot_id = await self._next_id("gates")
        await self._fetch("insert_slot", self._slot_params(slot_id, gate, holder, instance_id, now))
        return slot_id

    async def close_slot(self, slot_id: int, now: datetime) -> bool:
        """Stamp `released_at` on a held row; False when it was already released."""
        rows = await self._fetch("close_slot", {"id": slot_id, "now": self._time(now)})
        return len(rows) == 1

    async def mirror_open(self, gate: str, holder: str, instance_id: str, now: datetime) -> int:
        """Queue the insert of a held `gates` row; answers its id (known at once).

        Gate rows need no durability before the caller proceeds (recovery at start
        releases every open row); writes keep their order.
        """
        slot_id = await self._next_id("gates")
        params = self._slot_params(slot_id, gate, holder, instance_id, now)
        self._queue("insert_slot", slot_id, params)
        return slot_id

    def mirror_close(self, slot_id: int, now: datetime) -> None:
        """Queue the release of a row queued by `mirror_open` (exactly once)."""
        released_at = self._time(now)
        insert = self._pending("insert_slot", slot_id)
        if insert is not None:  # released before its row was written: one row, both times
            if insert["released_at"] is None:
                insert["released_at"] = released_at
            return
        params = {"id": slot_id, "now": released_at}
        self._queue("release_slot", slot_id, params, fold="first")

    def _slot_params(
        self, slot_id: int, gate: str, holder: str, instance_id: str, now: datetime
    ) -> Params:
        return {
            "id": slot_id,
            "gate": gate,
            "holder": holder,
            "instance_id": instance_id,
            "now": self._time(now),
            "released_at": None,
        }

    async def held_slots(self) -> list[SlotRow]:
        """Every row with `released_at` NULL, oldest first."""
        return [self.slot_from_row(row) for row in await self._fetch("held_slots")]

    async def gate_row_counts(self) -> GateRowCounts:
        """How many `gates` rows are held and how many released."""
        row = (await self._fetch("gate_row_counts"))[0]
        return GateRowCounts(held=row["held"], released=row["released"])

    # -- purge and retention ----------------------------------------------------------

    async def purge_released(self, before: datetime, batch_size: int) -> int:
        """Delete one batch: up to `batch_size` gate rows released before `before`.

        Oldest first, committed on return; a held row is never deleted. Answers how
        many rows went (fewer than `batch_size`: nothing older is left).
        """
        params = {"before": self._time(before), "batch_size": batch_size}
        return len(await self._fetch("purge_released", params))

    async def count_purgeable(self, before: datetime) -> int:
        """How many gate rows were released before `before`."""
        count: int = (await self._fetch("count_purgeable", {"before": self._time(before)}))[0]["n"]
        return count

    async def purge_finished_dispatches(
        self, before: datetime, batch_size: int
    ) -> ExpiredDispatches:
        """Delete one batch: up to `batch_size` final dispatches finished before `before`.

        Their attempts go with them, in the same transaction; queued and in-flight
        dispatches are never deleted. Their idempotency keys become free again.
        """
        params = {"before": self._time(before), "batch_size": batch_size}
        async with self._tx() as tx:
            attempts = len(await tx.fetch("retention_attempts", params))
            dispatches = len(await tx.fetch("retention_dispatches", params))
        return ExpiredDispatches(dispatches=dispatches, attempts=attempts)

    async def count_expired_dispatches(self, before: datetime) -> ExpiredDispatches:
        """How many final dispatches finished before `before`, and their attempts."""
        row = (await self._fetch("count_expired", {"before": self._time(before)}))[0]
        return ExpiredDispatches(dispatches=row["dispatches"], attempts=row["attempts"])

    async def reclaim_space(self) -> int:
        """Give one step of free pages back to the file system; answer how many went.

        0 when nothing is free or the backend cannot (the default). Callers loop,
        yielding between steps, until it answers 0.
        """
        return 0

    async def optimize(self) -> None:
        """Refresh the planner's statistics after large changes (cheap when current)."""
        await self._fetch("optimize")

    # -- lifecycle --------------------------------------------------------------------

    async def recover(self, instance_id: str, now: datetime) -> RecoveryReport:
        """Undo what dead instances left, in one transaction.

        Held gate rows are released and marked recovered; `running` attempts become
        `interrupted`; `planning`/`running` dispatches return to `queued`. Where one
        daemon owns the database every other instance is dead; on a shared one only
        those silent for over `instance_ttl`.
        """
        since = now - timedelta(seconds=self.instance_ttl) if self.shared else FAR_FUTURE
        return await self._reap(instance_id, now, since)

    async def reap_dead_instances(
        self, instance_id: str, now: datetime, ttl: float
    ) -> RecoveryReport:
        """Recovery for instances other than `instance_id` whose heartbeat is older than
        `ttl` seconds (or that never registered): their held rows released (recovered),
        running attempts interrupted, in-flight dispatches requeued; they are marked
        stopped. Rows of live instances are never touched."""
        return await self._reap(instance_id, now, now - timedelta(seconds=ttl))

    async def _reap(self, keep: str, now: datetime, since: datetime) -> RecoveryReport:
        params = {"keep": keep, "now": self._time(now), "since": self._time(since)}
        async with self._tx() as tx:
            # The lease first: its row lock waits for a fenced write of that instance in
            # flight, and once it is taken every later fenced write of it is refused.
            await tx.fetch("reap_instances", params)
            slots = await tx.fetch("reap_slots", params)
            attempts = await tx.fetch("reap_attempts", params)
            dispatches = await tx.fetch("reap_dispatches", params)
        return RecoveryReport(
            slots_released=len(slots),
            attempts_interrupted=len(attempts),
            dispatches_requeued=len(dispatches),
        )

    async def register_instance(self, instance: Instance) -> None:
        """Insert the row of a starting daemon."""
        params = {
            "id": instance.id,
            "hostname": instance.hostname,
            "pid": instance.pid,
            "version": instance.version,
            "started_at": self._time(instance.started_at),
            "heartbeat_at": self._time(instance.heartbeat_at),
            "stopped_at": None if instance.stopped_at is None else self._time(instance.stopped_at),
        }
        await self._fetch("register_instance", params)

    async def heartbeat(self, instance_id: str, now: datetime) -> None:
        """Stamp `heartbeat_at`: renew the lease. Raises `LeaseLost` when the instance was
        reaped meanwhile: a heartbeat never revives it."""
        if not await self._fetch("heartbeat", {"id": instance_id, "now": self._time(now)}):
            exc = LeaseLost(f"instance {instance_id} was reaped: its lease is gone")
            self._lease_lost(exc)
            raise exc

    async def stop_instance(self, instance_id: str, now: datetime) -> None:
        """Stamp `stopped_at` (once)."""
        await self._fetch("stop_instance", {"id": instance_id, "now": self._time(now)})

    async def live_instances(self, since: datetime) -> list[Instance]:
        """Instances not stopped whose heartbeat is at or after `since`."""
        rows = await self._fetch("live_instances", {"since": self._time(since)})
        return [self.instance_from_row(row) for row in rows]

    # -- several daemons ------------------------------------------------------------------

    async def try_take_slot(
        self, gate: str, holder: str, instance_id: str, capacity: int, now: datetime
    ) -> int | None:
        """Insert a held row for `gate` only while fewer than `capacity` rows of that gate
        are held (by any instance), atomically; the row id, or None when full."""
        slot_id = await self._next_id("gates")
        async with self._tx() as tx:
            if self.shared:
                await self._check_lease(tx)
                await tx.fetch("gate_lock", {"gate": gate})
            held: int = (await tx.fetch("gate_held_count", {"gate": gate}))[0]["n"]
            if held >= capacity:
                return None
            params = self._slot_params(slot_id, gate, holder, instance_id, now)
            await tx.fetch("insert_slot", params)
        return slot_id

    @asynccontextmanager
    async def maintenance_lock(self, name: str) -> AsyncIterator[bool]:
        """`async with store.maintenance_lock("purge") as mine:` -- `mine` is True on
        exactly one instance at a time; always True where only one daemon can run."""
        yield True

    async def subscribe(
        self,
        on_change: Callable[[], None],
        *,
        on_cancel: Callable[[], None] | None = None,
        on_released: Callable[[], None] | None = None,
    ) -> None:
        """Call `on_change` when another process inserted a dispatch, asked to cancel one
        or released a slot (`on_cancel`, `on_released` instead for those two, where the
        backend can tell them apart); a no-op where polling is all there is."""
        return None

    async def check(self, *, full: bool = False, budget: float | None = None) -> str:
        """Look for damage: "ok", "partial" (the `budget` in seconds ran out first), or
        `DatabaseCorrupt`. `full` reads everything (indexes against tables too). The
        default has nothing to look at."""
        return "ok"

    # -- rows to records ----------------------------------------------------------------

    def dispatch_from_row(self, row: Row) -> Dispatch:
        """A `dispatches` row as a record."""
        plan = row["plan"]
        return Dispatch(
            id=row["id"],
            task=row["task"],
            params=json.loads(row["params"]),
            key=row["key"],
            fingerprint=row["fingerprint"],
            priority=row["priority"],
            status=DispatchStatus(row["status"]),
            plan=None if plan is None else tuple(Step.from_json(s) for s in json.loads(plan)),
            current_step=row["current_step"],
            gate_key=row["gate_key"],
            not_before=self._time_or_none(row["not_before"]),
            cancel_requested=bool(row["cancel_requested"]),
            error=row["error"],
            instance_id=row["instance_id"],
            created_at=self._from_time(row["created_at"]),
            updated_at=self._from_time(row["updated_at"]),
            started_at=self._time_or_none(row["started_at"]),
            finished_at=self._time_or_none(row["finished_at"]),
            claims=row["claims"],
            series=row["series"],
            follows=row["follows"],
        )

    def attempt_from_row(self, row: Row) -> Attempt:
        """An `attempts` row as a record."""
        return Attempt(
            id=row["id"],
            dispatch_id=row["dispatch_id"],
            step_index=row["step_index"],
            step=row["step"],
            runner=row["runner"],
            attempt=row["attempt"],
            status=AttemptStatus(row["status"]),
            started_at=self._from_time(row["started_at"]),
            ended_at=self._time_or_none(row["ended_at"]),
            exit_code=row["exit_code"],
            error=row["error"],
            output=row["output"],
            instance_id=row["instance_id"],
            result=row["result"],
            series=row["series"],
        )

    def slot_from_row(self, row: Row) -> SlotRow:
        """A `gates` row as a record."""
        return SlotRow(
            id=row["id"],
            gate=row["gate"],
            holder=row["holder"],
            instance_id=row["instance_id"],
            acquired_at=self._from_time(row["acquired_at"]),
            released_at=self._time_or_none(row["released_at"]),
            recovered=bool(row["recovered"]),
        )

    def instance_from_row(self, row: Row) -> Instance:
        """An `instances` row as a record."""
        return Instance(
            id=row["id"],
            hostname=row["hostname"],
            pid=row["pid"],
            version=row["version"],
            started_at=self._from_time(row["started_at"]),
            heartbeat_at=self._from_time(row["heartbeat_at"]),
            stopped_at=self._time_or_none(row["stopped_at"]),
        )

    def _attempts(self, rows: list[Row]) -> list[Attempt]:
        """Oldest first: by start, then id (ids of several daemons interleave)."""
        attempts = [self.attempt_from_row(row) for row in rows]
        attempts.sort(key=lambda a: (a.started_at, a.id))
        return attempts

    def _time_or_none(self, value: Any) -> datetime | None:
        return None if value is None else self._from_time(value)

    # -- plumbing -----------------------------------------------------------------------

    async def _fetch(
        self, name: str, params: Mapping[str, Any] | None = None, *, first: bool = False
    ) -> list[Row]:
        """One named statement, atomic by itself, after the queued writes have landed
        (`first`: ahead of them)."""
        self._check_open()
        if not first:
            await self._writes.settle()
        try:
            return await self._execute(name, params or {}, first=first)
        except DatabaseCorrupt as exc:
            self._corrupt(exc)
            raise
        except LeaseLost as exc:
            self._lease_lost(exc)
            raise

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Tx]:
        """A transaction of several statements (read-modify-write), after the queued
        writes; rolled back on any exception, cancellation included."""
        self._check_open()
        await self._writes.settle()
        try:
            async with self._transaction() as tx:
                yield tx
        except DatabaseCorrupt as exc:
            self._corrupt(exc)
            raise
        except LeaseLost as exc:
            self._lease_lost(exc)
            raise

    async def _migrate(self) -> None:
        """Apply the migrations this database has not seen, in one transaction."""
        assert self.migrations is not None
        migrations = load_migrations(self.migrations)
        known = migrations[-1].version if migrations else 0
        newer = None
        async with self._tx() as tx:
            if self.shared:
                await tx.fetch("migrations_lock")
            await tx.fetch("migrations_create_table")
            current: int = (await tx.fetch("migrations_current"))[0]["version"]
            if current > known:
                newer = current
            for migration in migrations:
                if migration.version > current:
                    await self._apply_migration(tx, migration)
                    now = self._time(datetime.now(UTC))
                    await tx.fetch("migrations_record", {"version": migration.version, "now": now})
        if newer is not None:  # outside the transaction: the check reads the whole file
            await self._newer_schema(newer, known)

    async def _check_schema(self) -> None:
        """For a store opened only to read, which migrates nothing: refuse a schema
        older or newer than this code's (it would read rows without the columns it
        expects, or with ones it does not know)."""
        assert self.migrations is not None
        migrations = load_migrations(self.migrations)
        known = migrations[-1].version if migrations else 0
        current: int = (await self._execute("migrations_current", {}, first=True))[0]["version"]
        if current > known:
            await self._newer_schema(current, known)
        if current < known:
            raise SchemaBehind(
                f"database {self.database} is at schema version {current}, older than this "
                f"dispatcher's ({known}): the daemon upgrades it when it starts (or run "
                "`dispatcher init`); read commands change nothing"
            )

    async def _newer_schema(self, version: int, known: int) -> None:
        """Refuse a schema this code does not know, unless the number is garbage read
        from damaged pages (then `check` raises `DatabaseCorrupt`)."""
        await self.check(budget=10.0)
        raise StoreError(
            f"database schema version {version} is newer than this dispatcher supports "
            f"({known}): upgrade dispatcher"
        )

    async def _next_id(self, table: str) -> int:
        """A new row id for `table`, known before the row is written."""
        while True:
            block = self._ids.get(table)
            if block is not None:
                for value in block:
                    return value
            fresh = await self._id_block(table)
            if self._ids.get(table) is block:  # nobody refilled it meanwhile
                self._ids[table] = iter(fresh)

    def _queue(self, name: str, key: Any, params: Params, fold: Fold = "replace") -> None:
        """Queue one write (see `WriteBuffer.put`); ignored once the store is closed."""
        if not self._closed:
            self._writes.put(name, key, params, fold)

    async def _landed(self, name: str, key: Any) -> None:
        """Wait for one queued write (see `WriteBuffer.landed`)."""
        self._check_open()
        await self._writes.landed(name, key)

    def _pending(self, name: str, key: Any) -> Params | None:
        """The queued `name` write of row `key`, while it can still be changed."""
        return self._writes.queued_write(name, key)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"database {self.database}: the store is closed")

    def _corrupt(self, exc: DatabaseCorrupt) -> None:
        if self._corrupt_seen:
            return
        self._corrupt_seen = True
        log.critical("database_corrupt", database=self.database, error=str(exc))
        if self.on_fatal is not None:
            self.on_fatal(exc)

    async def _write_fenced(self, writes: WriteBatch) -> None:
        """A batch of queued writes, fenced on the lease where several daemons share the
        database (see `_write_batch`)."""
        await self._write_batch(writes, self.lease if self.shared else None)

    async def _check_lease(self, tx: Tx) -> None:
        """Inside `tx`: refuse to go on when this instance's lease was taken."""
        if self.lease is not None and not await tx.fetch(
            "lease_check", {"instance_id": self.lease}
        ):
            raise LeaseLost(f"instance {self.lease} was reaped: its writes are refused")

    def _lease_lost(self, exc: LeaseLost) -> None:
        if self.on_lease_lost is not None:
            self.on_lease_lost(exc)

    def _available(self) -> None:
        if self.on_available is not None:
            self.on_available()

    def _submitted(self) -> None:
        """New work or a cancel request is committed: tell the daemon, where the backend
        has a way (SQLite's wake-up datagram; PostgreSQL's triggers NOTIFY by
        themselves)."""
        return None

    def _time(self, value: datetime) -> Any:
        """A time as the backend stores it (the default: an aware UTC datetime)."""
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the store takes timezone-aware times")
        return value.astimezone(UTC)

    def _from_time(self, value: Any) -> datetime:
        """A stored time as an aware UTC datetime."""
        stamp: datetime = value
        return stamp.astimezone(UTC)

    def _list(self, values: Sequence[Any]) -> Any:
        """A list parameter as the backend binds it (the default: a list)."""
        return list(values)

    # -- primitives of a backend ----------------------------------------------------------

    @abstractmethod
    async def _execute(self, name: str, params: Mapping[str, Any], *, first: bool) -> list[Row]:
        """Run one named statement in a transaction of its own; answer its rows.

        A param may be a function (`claim_many`'s limit): pass the params through
        `as_sent` right before the statement goes out, after any wait for the
        connection."""

    @abstractmethod
    def _transaction(self) -> AbstractAsyncContextManager[Tx]:
        """BEGIN (taking the write lock where that is how writers are serialized) ...
        COMMIT; ROLLBACK on any exception."""

    @abstractmethod
    async def _write_batch(self, writes: WriteBatch, fence: str | None) -> None:
        """Every write of `writes` in one transaction, one `executemany` per statement.

        `fence`: first, in the same transaction, check that this instance's lease is
        current (`lease_check`), and raise `LeaseLost` when it is not. Raises `StoreBusy`
        / `StoreUnwritable` when it may land later, `DatabaseCorrupt` when it never will,
        and `StoreError` when the database refused a write.
        """

    @abstractmethod
    async def _id_block(self, table: str) -> Iterator[int] | range:
        """Row ids for `table` (`attempts` or `gates`) that no writer will use."""

    @abstractmethod
    async def _apply_migration(self, tx: Tx, migration: Migration) -> None:
        """Every statement of one migration, inside `tx`."""

    @abstractmethod
    async def _close(self) -> None:
        """Close connections."""
