"""Test doubles shipped with the package: a fake clock and an in-memory store.

`InMemoryStore` stands on the same `Store` base as SQLite and PostgreSQL: its rows are
plain dicts, and each named statement is a small Python function over them (where the
real backends run SQL). The contract suite in `tests/contract` runs against all three.
Its writes apply at once (no queue), and its state reads as dicts of records
(`dispatches`, `attempts`, `slots`, `instances`) for tests.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from dispatcher.errors import LeaseLost, StoreError
from dispatcher.models import Attempt, Dispatch, Instance, SlotRow
from dispatcher.store.base import Migration, Row, Store, as_sent
from dispatcher.store.writes import Fold, Params, WriteBatch

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)

_IN_FLIGHT = ("planning", "running")
_FINAL = ("succeeded", "failed", "cancelled")

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

Table = dict[Any, dict[str, Any]]
Statement = Callable[[Mapping[str, Any]], list[Row]]


class InMemoryStore(Store):
    """The `Store` in plain Python, for unit tests. Not thread-safe.

    A statement never suspends, so a transaction of several is as atomic as one of
    the SQLite store.
    """

    shared = False

    def __init__(self) -> None:
        super().__init__("memory")
        self.tables: dict[str, Table] = {"dispatches": {}, "attempts": {}, "gates": {}}
        self.tables["instances"] = {}
        self.tables["schedules"] = {}
        self._keys: dict[str, int] = {}
        self._dispatch_ids = itertools.count(1)
        self._statements: dict[str, Statement] = {
            name: getattr(self, "_sql_" + name) for name in _STATEMENTS
        }

    @property
    def closed(self) -> bool:
        return self._closed

    # -- state for tests, as records ----------------------------------------------------

    @property
    def dispatches(self) -> dict[int, Dispatch]:
        return {k: self.dispatch_from_row(r) for k, r in self.tables["dispatches"].items()}

    @property
    def attempts(self) -> dict[int, Attempt]:
        return {k: self.attempt_from_row(r) for k, r in self.tables["attempts"].items()}

    @property
    def slots(self) -> dict[int, SlotRow]:
        return {k: self.slot_from_row(r) for k, r in self.tables["gates"].items()}

    @property
    def instances(self) -> dict[str, Instance]:
        return {k: self.instance_from_row(r) for k, r in self.tables["instances"].items()}

    # -- primitives -----------------------------------------------------------------------

    async def _execute(self, name: str, params: Mapping[str, Any], *, first: bool) -> list[Row]:
        await asyncio.sleep(0)
        return self._statements[name](as_sent(params))

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_MemoryTx]:
        await asyncio.sleep(0)
        yield _MemoryTx(self._statements)

    async def _write_batch(self, writes: WriteBatch, fence: str | None) -> None:
        if fence is not None and not self._sql_lease_check({"instance_id": fence}):
            raise LeaseLost(f"instance {fence} was reaped: its writes are refused")
        for name, rows in writes:
            for row in rows:
                self._statements[name](row)

    def _queue(self, name: str, key: Any, params: Params, fold: Fold = "replace") -> None:
        """Applied at once: the fake has no queue (tests read the state right after).
        Fenced on the lease like a batch of the shared stores."""
        if self._closed:
            return
        if (
            self.shared
            and self.lease is not None
            and not self._sql_lease_check({"instance_id": self.lease})
        ):
            self._lease_lost(LeaseLost(f"instance {self.lease} was reaped"))
            return
        self._statements[name](params)

    def _pending(self, name: str, key: Any) -> Params | None:
        return None

    async def _id_block(self, table: str) -> Iterator[int]:
        return itertools.count(max(self.tables[table], default=0) + 1)

    async def _apply_migration(self, tx: Any, migration: Migration) -> None:
        raise StoreError("the in-memory store has no schema to migrate")

    async def _close(self) -> None:
        return None

    # -- statements: dispatches ----------------------------------------------------------------

    def _sql_insert_dispatch(self, p: Mapping[str, Any]) -> list[Row]:
        if p["key"] is not None and p["key"] in self._keys:
            return []
        row = dict(_NEW_DISPATCH, id=next(self._dispatch_ids), created_at=p["now"])
        row.update({k: p[k] for k in ("task", "params", "key", "fingerprint", "priority")})
        row.update(gate_key=p["gate_key"], updated_at=p["now"])
        row.update(not_before=p["not_before"], follows=p["follows"])
        self.tables["dispatches"][row["id"]] = row
        if row["key"] is not None:
            self._keys[row["key"]] = row["id"]
        return [{"id": row["id"], "status": row["status"]}]

    def _sql_dispatch_by_key(self, p: Mapping[str, Any]) -> list[Row]:
        return [self.tables["dispatches"][self._keys[p["key"]]]] if p["key"] in self._keys else []

    def _sql_claim_many(self, p: Mapping[str, Any]) -> list[Row]:
        now, blocked = p["now"], set(p["blocked_gates"])
        runnable = [
            row
            for row in self.tables["dispatches"].values()
            if row["status"] == "queued"
            and (row["not_before"] is None or row["not_before"] <= now)
            and (row["gate_key"] is None or row["gate_key"] not in blocked)
            and not self._unfinished(row["follows"])
        ]
        runnable.sort(key=lambda row: (-row["priority"], row["id"]))
        for row in runnable[: p["limit"]]:
            row["status"] = "planning" if row["plan"] is None else "running"
            row["instance_id"] = p["instance_id"]
            row["started_at"] = row["started_at"] or now
            row["claims"] += 1
            row["updated_at"] = now
        return [dict(row) for row in runnable[: p["limit"]]]

    def _unfinished(self, dispatch_id: int | None) -> bool:
        row = self.tables["dispatches"].get(dispatch_id)
        return row is not None and row["status"] not in _FINAL

    def _sql_retry_dispatch(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["dispatches"].get(p["id"])
        if row is None or row["status"] not in ("failed", "cancelled"):
            return []
        row.update(status="queued", error=None, finished_at=None, cancel_requested=False)
        row.update(not_before=None, instance_id=None, updated_at=p["now"])
        row["series"] += 1
        return [dict(row)]

    def _sql_next_due(self, p: Mapping[str, Any]) -> list[Row]:
        rows = self.tables["dispatches"].values()
        due = [
            row["not_before"]
            for row in rows
            if row["status"] == "queued" and row["not_before"] and row["not_before"] > p["now"]
        ]
        return [{"due": min(due, default=None)}]

    # -- statements: schedules -------------------------------------------------------------

    def _sql_schedule_ensure(self, p: Mapping[str, Any]) -> list[Row]:
        row = {"name": p["name"], "last_fire": p["never"], "last_outcome": "none"}
        row.update(last_dispatch_id=None, updated_at=p["now"])
        self.tables["schedules"].setdefault(p["name"], row)
        return []

    def _sql_schedule_for_update(self, p: Mapping[str, Any]) -> list[Row]:
        return [self._schedule_row(self.tables["schedules"][p["name"]])]

    def _sql_schedule_record(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["schedules"][p["name"]]
        if row["last_fire"] < p["fire"]:
            row.update(last_fire=p["fire"], last_outcome=p["outcome"], updated_at=p["now"])
            if p["dispatch_id"] is not None:
                row["last_dispatch_id"] = p["dispatch_id"]
        return []

    def _sql_schedule_states(self, p: Mapping[str, Any]) -> list[Row]:
        rows = self.tables["schedules"]
        return [self._schedule_row(rows[name]) for name in sorted(rows)]

    def _schedule_row(self, row: Mapping[str, Any]) -> Row:
        dispatch = self.tables["dispatches"].get(row["last_dispatch_id"])
        status = None if dispatch is None else dispatch["status"]
        return {**row, "last_status": status}

    def _fenced_out(self, p: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
        """Another instance holds the dispatch (the `instance_id` fence of the SQL)."""
        return p["instance_id"] is not None and row["instance_id"] != p["instance_id"]

    def _sql_write_progress(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["dispatches"].get(p["id"])
        if row is None or row["status"] in _FINAL or self._fenced_out(p, row):
            return []
        for column in ("plan", "current_step", "status"):
            if p[column] is not None:
                row[column] = p[column]
        if p["final"]:
            row.update(error=p["error"], finished_at=p["now"])
        row["updated_at"] = p["now"]
        return []

    def _sql_requeue(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["dispatches"].get(p["id"])
        if row is not None and row["status"] in _IN_FLIGHT and not self._fenced_out(p, row):
            row.update(status="queued", instance_id=None, not_before=p["not_before"])
            row["updated_at"] = p["now"]
        return []

    def _sql_requeue_abandoned(self, p: Mapping[str, Any]) -> list[Row]:
        keep = set(p["keep"])
        found = [
            row
            for row in self.tables["dispatches"].values()
            if row["instance_id"] == p["instance_id"]
            and row["status"] in _IN_FLIGHT
            and row["id"] not in keep
        ]
        for row in found:
            row.update(status="queued", instance_id=None, updated_at=p["now"])
        return [{"id": row["id"]} for row in found]

    def _sql_request_cancel(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["dispatches"].get(p["id"])
        if row is None or row["status"] in _FINAL:
            return []
        if row["status"] == "queued":
            row.update(status="cancelled", finished_at=p["now"], error=p["error"])
        else:
            row["cancel_requested"] = True
        row["updated_at"] = p["now"]
        return [dict(row)]

    def _sql_cancel_requests(self, p: Mapping[str, Any]) -> list[Row]:
        rows = self.tables["dispatches"]
        return [{"id": i} for i in p["ids"] if i in rows and rows[i]["cancel_requested"]]

    def _sql_get_dispatch(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["dispatches"].get(p["id"])
        return [] if row is None else [dict(row)]

    def _sql_list_dispatches(self, p: Mapping[str, Any]) -> list[Row]:
        rows = sorted(self.tables["dispatches"].values(), key=lambda row: -row["id"])
        return [dict(row) for row in rows[: p["limit"]]]

    def _sql_list_dispatches_by_status(self, p: Mapping[str, Any]) -> list[Row]:
        rows = self._sql_list_dispatches({"limit": len(self.tables["dispatches"])})
        return [row for row in rows if row["status"] == p["status"]][: p["limit"]]

    def _sql_count_by_status(self, p: Mapping[str, Any]) -> list[Row]:
        counts: dict[str, int] = {}
        for row in self.tables["dispatches"].values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return [{"status": status, "n": n} for status, n in counts.items()]

    # -- statements: attempts ----------------------------------------------------------------

    def _sql_insert_attempt(self, p: Mapping[str, Any]) -> list[Row]:
        self._insert("attempts", p)
        return []

    def _sql_finish_attempt(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["attempts"].get(p["id"])
        if row is not None and row["status"] == "running":
            ended = ("status", "ended_at", "exit_code", "error", "output", "result")
            row.update({k: p[k] for k in ended})
        return []

    def _sql_step_attempts(self, p: Mapping[str, Any]) -> list[Row]:
        return [
            dict(row)
            for row in self.tables["attempts"].values()
            if row["dispatch_id"] == p["dispatch_id"] and row["step_index"] == p["step_index"]
        ]

    def _sql_list_attempts(self, p: Mapping[str, Any]) -> list[Row]:
        rows = self.tables["attempts"].values()
        return [dict(row) for row in rows if row["dispatch_id"] == p["dispatch_id"]]

    # -- statements: gate rows ----------------------------------------------------------------

    def _sql_insert_slot(self, p: Mapping[str, Any]) -> list[Row]:
        row = {k: p[k] for k in ("id", "gate", "holder", "instance_id", "released_at")}
        self._insert("gates", {**row, "acquired_at": p["now"], "recovered": False})
        return []

    def _sql_release_slot(self, p: Mapping[str, Any]) -> list[Row]:
        return self._sql_close_slot(p)

    def _sql_close_slot(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["gates"].get(p["id"])
        if row is None or row["released_at"] is not None:
            return []
        row["released_at"] = p["now"]
        return [{"id": row["id"]}]

    def _sql_held_slots(self, p: Mapping[str, Any]) -> list[Row]:
        rows = self.tables["gates"]
        return [dict(rows[i]) for i in sorted(rows) if rows[i]["released_at"] is None]

    def _sql_gate_row_counts(self, p: Mapping[str, Any]) -> list[Row]:
        held = len(self._sql_held_slots(p))
        return [{"held": held, "released": len(self.tables["gates"]) - held}]

    def _sql_gate_held_count(self, p: Mapping[str, Any]) -> list[Row]:
        return [{"n": sum(1 for row in self._sql_held_slots(p) if row["gate"] == p["gate"])}]

    def _sql_lease_check(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["instances"].get(p["instance_id"])
        return [] if row is None or row["stopped_at"] is not None else [{"id": row["id"]}]

    def _sql_gate_lock(self, p: Mapping[str, Any]) -> list[Row]:
        return []  # a statement never suspends: takers of one gate are serialized anyway

    # -- statements: purge and retention ----------------------------------------------------------

    def _sql_purge_released(self, p: Mapping[str, Any]) -> list[Row]:
        found = self._released_before(p["before"])[: p["batch_size"]]
        for row in found:
            del self.tables["gates"][row["id"]]
        return [{"id": row["id"]} for row in found]

    def _sql_count_purgeable(self, p: Mapping[str, Any]) -> list[Row]:
        return [{"n": len(self._released_before(p["before"]))}]

    def _released_before(self, before: datetime) -> list[dict[str, Any]]:
        rows = self.tables["gates"].values()
        found = [row for row in rows if row["released_at"] and row["released_at"] < before]
        return sorted(found, key=lambda row: (row["released_at"], row["id"]))

    def _sql_retention_attempts(self, p: Mapping[str, Any]) -> list[Row]:
        ids = {row["id"] for row in self._expired(p["before"])[: p["batch_size"]]}
        found = [a for a in self.tables["attempts"].values() if a["dispatch_id"] in ids]
        for row in found:
            del self.tables["attempts"][row["id"]]
        return [{"id": row["id"]} for row in found]

    def _sql_retention_dispatches(self, p: Mapping[str, Any]) -> list[Row]:
        found = self._expired(p["before"])[: p["batch_size"]]
        for row in found:
            del self.tables["dispatches"][row["id"]]
            if row["key"] is not None:
                del self._keys[row["key"]]
        return [{"id": row["id"]} for row in found]

    def _sql_count_expired(self, p: Mapping[str, Any]) -> list[Row]:
        ids = {row["id"] for row in self._expired(p["before"])}
        attempts = sum(1 for a in self.tables["attempts"].values() if a["dispatch_id"] in ids)
        return [{"dispatches": len(ids), "attempts": attempts}]

    def _expired(self, before: datetime) -> list[dict[str, Any]]:
        rows = self.tables["dispatches"].values()
        found = [
            row
            for row in rows
            if row["status"] in _FINAL and row["finished_at"] and row["finished_at"] < before
        ]
        return sorted(found, key=lambda row: (row["finished_at"], row["id"]))

    def _sql_optimize(self, p: Mapping[str, Any]) -> list[Row]:
        return []

    # -- statements: instances and recovery -------------------------------------------------------

    def _dead(self, p: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
        """Held by neither `keep` nor an instance live at `since` (as `reap_*` in SQL)."""
        owner = self.tables["instances"].get(row["instance_id"])
        live = owner is not None and not owner["stopped_at"] and owner["heartbeat_at"] >= p["since"]
        return (row["instance_id"] or "") != p["keep"] and not live

    def _sql_reap_slots(self, p: Mapping[str, Any]) -> list[Row]:
        rows = self.tables["gates"].values()
        found = [row for row in rows if row["released_at"] is None and self._dead(p, row)]
        for row in found:
            row.update(released_at=p["now"], recovered=True)
        return [{"id": row["id"]} for row in found]

    def _sql_reap_attempts(self, p: Mapping[str, Any]) -> list[Row]:
        rows = self.tables["attempts"].values()
        found = [row for row in rows if row["status"] == "running" and self._dead(p, row)]
        for row in found:
            row.update(status="interrupted", ended_at=p["now"])
        return [{"id": row["id"]} for row in found]

    def _sql_reap_dispatches(self, p: Mapping[str, Any]) -> list[Row]:
        rows = self.tables["dispatches"].values()
        found = [row for row in rows if row["status"] in _IN_FLIGHT and self._dead(p, row)]
        for row in found:
            row.update(status="queued", instance_id=None, updated_at=p["now"])
        return [{"id": row["id"]} for row in found]

    def _sql_reap_instances(self, p: Mapping[str, Any]) -> list[Row]:
        for row in self.tables["instances"].values():
            silent = row["heartbeat_at"] < p["since"]
            if not row["stopped_at"] and silent and row["id"] != p["keep"]:
                row["stopped_at"] = p["now"]
        return []

    def _sql_register_instance(self, p: Mapping[str, Any]) -> list[Row]:
        self._insert("instances", p)
        return []

    def _sql_heartbeat(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["instances"].get(p["id"])
        if row is None or row["stopped_at"] is not None:
            return []
        row["heartbeat_at"] = p["now"]
        return [{"id": row["id"]}]

    def _sql_stop_instance(self, p: Mapping[str, Any]) -> list[Row]:
        row = self.tables["instances"].get(p["id"])
        if row is not None and row["stopped_at"] is None:
            row["stopped_at"] = p["now"]
        return []

    def _sql_live_instances(self, p: Mapping[str, Any]) -> list[Row]:
        rows = self.tables["instances"].values()
        found = [r for r in rows if not r["stopped_at"] and r["heartbeat_at"] >= p["since"]]
        return sorted(found, key=lambda row: (row["started_at"], row["id"]))

    def _insert(self, table: str, row: Mapping[str, Any]) -> None:
        if row["id"] in self.tables[table]:
            raise StoreError(f"memory: {table} already has a row {row['id']!r}")
        self.tables[table][row["id"]] = dict(row)


_NEW_DISPATCH: dict[str, Any] = {
    "status": "queued",
    "plan": None,
    "current_step": 0,
    "not_before": None,
    "cancel_requested": False,
    "error": None,
    "instance_id": None,
    "started_at": None,
    "finished_at": None,
    "claims": 0,
    "series": 0,
    "follows": None,
}

_STATEMENTS = sorted(
    name.removeprefix("_sql_") for name in vars(InMemoryStore) if name.startswith("_sql_")
)


class _MemoryTx:
    def __init__(self, statements: Mapping[str, Statement]) -> None:
        self._statements = statements

    async def fetch(self, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return self._statements[name](params or {})
