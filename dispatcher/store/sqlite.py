"""The SQLite store: the `Store` protocol on one `sqlite3` connection in WAL mode.

Every statement runs on the store's writer thread (`writer.py`), in batches: one
transaction and one hop back to the event loop for everything that was queued
together. A read-modify-write runs as one job (or as an exclusive transaction), under
`BEGIN IMMEDIATE`: in WAL mode a deferred transaction that upgrades from read to write
fails with SQLITE_BUSY_SNAPSHOT, which no busy timeout can wait out. Other processes
(the CLI beside the daemon) are serialized by SQLite's own lock and `busy_timeout`;
a `BEGIN` that still fails as busy is retried by the writer with backoff until
`busy_patience` has passed. Driver errors become `StoreBusy` / `StoreError` here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from dispatcher import wake
from dispatcher.errors import KeyConflict, NotFound, StoreBusy, StoreError
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
from dispatcher.store.sql import query
from dispatcher.store.writer import SQLiteWriter, is_busy

Params = Mapping[str, Any]
T = TypeVar("T")

CANCELLED_BEFORE_START = "cancelled before it started"

# -- timestamps ----------------------------------------------------------------------------


def to_db_time(value: datetime) -> str:
    """`2026-11-29T02:35:45.123456Z`: fixed width, so text order is time order."""
    if value.tzinfo is UTC:  # the clock's own times: the cheap way
        return value.isoformat(timespec="microseconds")[:-6] + "Z"
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: the store takes timezone-aware times")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def from_db_time(text: str) -> datetime:
    """The aware UTC datetime that `to_db_time` wrote."""
    return datetime.fromisoformat(text).astimezone(UTC)


def _db_time_or_none(value: datetime | None) -> str | None:
    return None if value is None else to_db_time(value)


def _time_or_none(text: str | None) -> datetime | None:
    return None if text is None else from_db_time(text)


# -- driver errors -------------------------------------------------------------------------


@contextmanager
def wrap_exceptions(path: Path, doing: str = "use") -> Iterator[None]:
    """Turn `sqlite3` errors into `StoreBusy` (lock contention) or `StoreError`."""
    try:
        yield
    except sqlite3.Error as exc:
        if is_busy(exc):
            raise StoreBusy(f"database {path} is busy: {exc}; try again") from exc
        hint = _WRITE_FAILED_HINT if _primary_code(exc) in _WRITE_FAILED_CODES else ""
        raise StoreError(f"cannot {doing} database {path}: {exc}{hint}") from exc


_WRITE_FAILED_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR})
_WRITE_FAILED_HINT = " (is the disk full or the file size limited? nothing half-written was kept)"


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


# -- migrations ----------------------------------------------------------------------------

_MIGRATION_NAME = re.compile(r"^(?P<version>\d+)_\w+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered file of `store/migrations/`."""

    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """The file split into complete statements (comments kept, blanks dropped)."""
        return split_statements(self.sql)


def split_statements(script: str) -> list[str]:
    """Split a SQL script on statement ends, as SQLite's own tokenizer sees them."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not _only_comments(buffer):
        raise ValueError(f"incomplete SQL statement at the end: {buffer.strip()[:60]!r}")
    return statements


def _only_comments(text: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in text.splitlines())


def load_migrations() -> tuple[Migration, ...]:
    """Every migration shipped with the package, in version order."""
    folder = resources.files("dispatcher.store").joinpath("migrations")
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


# -- rows to records -------------------------------------------------------------------------


def _plan_from_json(text: str | None) -> tuple[Step, ...] | None:
    if text is None:
        return None
    return tuple(Step.from_json(step) for step in json.loads(text))


def dispatch_from_row(row: sqlite3.Row) -> Dispatch:
    """A `dispatches` row as a record."""
    return Dispatch(
        id=row["id"],
        task=row["task"],
        params=json.loads(row["params"]),
        key=row["key"],
        fingerprint=row["fingerprint"],
        priority=row["priority"],
        status=DispatchStatus(row["status"]),
        plan=_plan_from_json(row["plan"]),
        current_step=row["current_step"],
        gate_key=row["gate_key"],
        not_before=_time_or_none(row["not_before"]),
        cancel_requested=bool(row["cancel_requested"]),
        error=row["error"],
        instance_id=row["instance_id"],
        created_at=from_db_time(row["created_at"]),
        updated_at=from_db_time(row["updated_at"]),
        started_at=_time_or_none(row["started_at"]),
        finished_at=_time_or_none(row["finished_at"]),
        claims=row["claims"],
    )


def attempt_from_row(row: sqlite3.Row) -> Attempt:
    """An `attempts` row as a record."""
    return Attempt(
        id=row["id"],
        dispatch_id=row["dispatch_id"],
        step_index=row["step_index"],
        step=row["step"],
        runner=row["runner"],
        attempt=row["attempt"],
        status=AttemptStatus(row["status"]),
        started_at=from_db_time(row["started_at"]),
        ended_at=_time_or_none(row["ended_at"]),
        exit_code=row["exit_code"],
        error=row["error"],
        output=row["output"],
        instance_id=row["instance_id"],
    )


def slot_from_row(row: sqlite3.Row) -> SlotRow:
    """A `gates` row as a record."""
    return SlotRow(
        id=row["id"],
        gate=row["gate"],
        holder=row["holder"],
        instance_id=row["instance_id"],
        acquired_at=from_db_time(row["acquired_at"]),
        released_at=_time_or_none(row["released_at"]),
        recovered=bool(row["recovered"]),
    )


def instance_from_row(row: sqlite3.Row) -> Instance:
    """An `instances` row as a record."""
    return Instance(
        id=row["id"],
        hostname=row["hostname"],
        pid=row["pid"],
        version=row["version"],
        started_at=from_db_time(row["started_at"]),
        heartbeat_at=from_db_time(row["heartbeat_at"]),
        stopped_at=_time_or_none(row["stopped_at"]),
    )


def _json_list(values: Iterable[object]) -> str:
    """A list parameter, bound as one JSON array and expanded in SQL with `json_each`."""
    return json.dumps(list(values))


def _new_dispatch_params(new: NewDispatch, now: datetime) -> dict[str, Any]:
    return {
        "task": new.task,
        "params": json.dumps(new.params, separators=(",", ":")),
        "key": new.key,
        "fingerprint": new.fingerprint,
        "priority": new.priority,
        "gate_key": new.gate_key,
        "now": to_db_time(now),
    }


def _incremental_vacuum(db: sqlite3.Connection) -> int:
    """One step of incremental vacuum (outside a transaction); pages given back."""
    before: int = db.execute(query("freelist_count")).fetchall()[0][0]
    if before == 0:
        return 0
    # executescript steps the PRAGMA to the end (see queries.sql).
    db.executescript(query("incremental_vacuum"))
    after: int = db.execute(query("freelist_count")).fetchall()[0][0]
    return max(before - after, 0)


def _auto_vacuum(db: sqlite3.Connection) -> None:
    db.execute(query("auto_vacuum_incremental")).fetchall()


def _wal(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode = WAL").fetchall()


def _nothing(_db: sqlite3.Connection) -> None:
    return None


def _pragmas(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")


_READ_ONLY = re.compile(r"^\s*(SELECT|WITH)\b", re.IGNORECASE)


@functools.cache
def _writes(name: str) -> bool:
    """Whether the named statement may write (reads can share a deferred transaction)."""
    return _READ_ONLY.match(_strip_comments(query(name))) is None


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StoreError(
            f"cannot open database {path}: cannot create folder {path.parent}: {reason}"
        ) from exc


# -- the store -------------------------------------------------------------------------------


class SQLiteStore:
    """The `Store` on a SQLite file in WAL mode. Create it with `await SQLiteStore.open()`.

    All statements run on one writer thread in batches (see `writer.py`).
    """

    shared = False
    """One daemon per file (the instance lock): the in-memory gate alone decides."""

    def __init__(self, writer: SQLiteWriter, path: Path, busy_timeout: float) -> None:
        self._writer = writer
        self._path = path
        self._busy_timeout = busy_timeout
        self._next_attempt_id: int | None = None
        # Queued writes folded into an earlier or later one of the same row while both
        # wait in the queue (see `start_attempt`, `save_plan`, `advance`, `mirror_open`).
        self._attempt_ends: dict[int, dict[str, Any]] = {}
        self._pending_plans: dict[int, str] = {}
        self._pending_steps: dict[int, int] = {}
        self._slot_releases: dict[SlotHandle, str] = {}
        self._listener: wake.Listener | None = None

    @classmethod
    async def open(
        cls, path: Path, *, busy_timeout_ms: int = 5000, busy_patience: float | None = None
    ) -> SQLiteStore:
        """Connect, configure (WAL, foreign keys, busy timeout) and migrate forward.

        `busy_patience` (seconds, default: the busy timeout) bounds how long one call
        keeps trying while the database is busy before it raises `StoreBusy`.
        """
        path = Path(path)
        _ensure_parent(path)
        busy_timeout = busy_timeout_ms / 1000
        patience = busy_timeout if busy_patience is None else busy_patience
        writer = SQLiteWriter(path, busy_timeout, busy_patience=patience)
        store = cls(writer, path, busy_timeout)
        try:
            with wrap_exceptions(path, "open"):
                await writer.start()
            await store._configure()
            await store._migrate()
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    async def close(self) -> None:
        """Write what is queued and close the connection; idempotent."""
        if self._listener is not None:
            self._listener.close()
        await self._writer.close()

    # -- plumbing ---------------------------------------------------------------------

    async def _configure(self) -> None:
        with self._wrap("open"):
            # Before WAL and before any table: only then does a new database take it.
            await self._writer.outside_transaction(_auto_vacuum)
            await self._enable_wal()
            await self._writer.outside_transaction(_pragmas)

    async def _enable_wal(self) -> None:
        """Switch to WAL, retrying while another connection holds the file.

        SQLite does not call the busy handler for a journal-mode change, so two
        processes opening a new database at once (the daemon and a `submit`) would
        otherwise see "database is locked" at once instead of waiting.
        """
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.005
        while True:
            try:
                await self._writer.outside_transaction(_wal)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    @contextmanager
    def _wrap(self, doing: str = "use") -> Iterator[None]:
        with wrap_exceptions(self._path, doing):
            yield

    async def _call(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        *,
        write: bool = True,
        atomic: bool = False,
        first: bool = False,
    ) -> Any:
        """Run fn on the writer thread in the next batch; errors become store errors."""
        with self._wrap():
            try:
                return await self._writer.call(fn, write=write, atomic=atomic, first=first)
            except sqlite3.ProgrammingError as exc:
                raise StoreError(f"database {self._path}: the store is closed") from exc

    async def _run(
        self, name: str, params: Params | None = None, *, first: bool = False
    ) -> list[sqlite3.Row]:
        """One named statement (in the next batch): atomic by itself. `first`: ahead of
        the queued writes (see `SQLiteWriter.call`)."""
        sql = query(name)
        bound = params or {}
        rows: list[sqlite3.Row] = await self._call(
            lambda db: db.execute(sql, bound).fetchall(), write=_writes(name), first=first
        )
        return rows

    def _post(self, name: str, params: Params) -> None:
        """Queue one named write without waiting; the next awaited write commits it."""
        sql = query(name)
        self._writer.post(lambda db: db.execute(sql, params))

    async def _run_count(self, name: str, params: Params) -> int:
        """One named write statement (in the next batch); answer the rows it changed."""
        sql = query(name)
        count: int = await self._call(lambda db: max(db.execute(sql, params).rowcount, 0))
        return count

    @asynccontextmanager
    async def _transaction(self, doing: str = "use") -> AsyncIterator[_Tx]:
        """`BEGIN IMMEDIATE` ... `COMMIT`, rolled back on any exception (even cancel)."""
        with self._wrap(doing):
            try:
                async with self._writer.exclusive() as run:
                    yield _Tx(run)
            except sqlite3.ProgrammingError as exc:
                raise StoreError(f"database {self._path}: the store is closed") from exc

    async def _migrate(self) -> None:
        migrations = load_migrations()
        known = migrations[-1].version if migrations else 0
        async with self._transaction("migrate") as tx:
            await tx.run("migrations_create_table")
            current: int = (await tx.run("migrations_current"))[0]["version"]
            if current > known:
                raise StoreError(
                    f"database schema version {current} is newer than this dispatcher "
                    f"supports ({known})"
                )
            for migration in migrations:
                if migration.version > current:
                    await tx.apply(migration)

    # -- submission -------------------------------------------------------------------

    async def check_and_reserve(self, new: NewDispatch, now: datetime) -> Reservation:
        """Create a `queued` dispatch, or answer the one already holding `new.key`."""
        reservation: Reservation = await self._call(lambda db: _reserve(db, new, now), atomic=True)
        if reservation.created:
            self._wake_daemon()
        return reservation

    async def reserve_many(
        self, news: Sequence[NewDispatch], now: datetime
    ) -> list[Reservation | Exception]:
        """Reserve each in one transaction; a `KeyConflict` is answered in its place."""
        if not news:
            return []

        def reserve_all(db: sqlite3.Connection) -> list[Reservation | Exception]:
            answers: list[Reservation | Exception] = []
            for new in news:
                try:
                    answers.append(_reserve(db, new, now))
                except KeyConflict as exc:
                    answers.append(exc)
            return answers

        result: list[Reservation | Exception] = await self._call(reserve_all, atomic=True)
        if any(isinstance(answer, Reservation) and answer.created for answer in result):
            self._wake_daemon()
        return result

    def _wake_daemon(self) -> None:
        """New work or a cancel request is committed: tell the daemon on this file,
        unless that is us (the daemon's own API acts on it directly)."""
        if self._listener is None:
            wake.send(self._path)

    # -- the dispatch loop ------------------------------------------------------------

    async def claim_next(
        self, instance_id: str, now: datetime, blocked_gates: Collection[str]
    ) -> Dispatch | None:
        """Take the next runnable `queued` dispatch (priority, then age) in one statement."""
        claimed = await self.claim_many(instance_id, now, blocked_gates, 1)
        return claimed[0] if claimed else None

    async def claim_many(
        self, instance_id: str, now: datetime, blocked_gates: Collection[str], limit: int
    ) -> list[Dispatch]:
        """Up to `limit` runnable dispatches in one statement, in claim order.

        The claim runs ahead of queued writes (none of them touches a queued dispatch):
        the loop has nothing to run until it returns, and they have nobody waiting.
        """
        params = {
            "instance_id": instance_id,
            "now": to_db_time(now),
            "blocked_gates": _json_list(sorted(blocked_gates)),
            "limit": limit,
        }
        rows = await self._run("claim_many", params, first=True)
        claimed = [dispatch_from_row(row) for row in rows]
        claimed.sort(key=lambda d: (-d.priority, d.id))
        return claimed

    async def save_plan(self, dispatch_id: int, plan: Sequence[Step], now: datetime) -> None:
        """Store the plan; the dispatch becomes `running` at step 0."""
        plan_json = json.dumps([step.to_json() for step in plan], separators=(",", ":"))
        params = {"id": dispatch_id, "now": to_db_time(now)}
        self._post_pending(self._pending_plans, dispatch_id, "save_plan", params, "plan", plan_json)

    async def advance(self, dispatch_id: int, next_step: int, now: datetime) -> None:
        """Record that every step before `next_step` has succeeded."""
        params = {"id": dispatch_id, "now": to_db_time(now)}
        self._post_pending(
            self._pending_steps, dispatch_id, "advance", params, "next_step", next_step
        )

    def _post_pending(
        self,
        pending: dict[int, Any],
        dispatch_id: int,
        name: str,
        params: Params,
        field: str,
        value: Any,
    ) -> None:
        """Queue `name` with `field` set to the dispatch's latest pending value. A later
        write of the row (`finish_dispatch`) that pops the value first writes it itself;
        this one then writes nothing (dict.pop decides: exactly one of them writes)."""
        pending[dispatch_id] = value
        sql = query(name)

        def update(db: sqlite3.Connection) -> None:
            latest = pending.pop(dispatch_id, None)
            if latest is not None:
                db.execute(sql, {**params, field: latest})

        self._writer.post(update)

    async def requeue(
        self, dispatch_id: int, now: datetime, not_before: datetime | None = None
    ) -> None:
        """Return an in-flight dispatch to `queued` (plan and current step kept)."""
        params = {
            "id": dispatch_id,
            "now": to_db_time(now),
            "not_before": _db_time_or_none(not_before),
        }
        await self._run("requeue", params)

    async def finish_dispatch(
        self, dispatch_id: int, status: DispatchStatus, now: datetime, error: str | None = None
    ) -> None:
        """Stamp a final status; a dispatch already final is left alone."""
        if not status.is_final:
            raise ValueError(f"finish_dispatch needs a final status, not {status}")
        params = {
            "id": dispatch_id,
            "status": str(status),
            "now": to_db_time(now),
            "error": error,
            # A plan or an `advance` still queued is written with the final status.
            "plan": self._pending_plans.pop(dispatch_id, None),
            "current_step": self._pending_steps.pop(dispatch_id, None),
        }
        self._post("finish_dispatch", params)

    async def request_cancel(self, dispatch_id: int, now: datetime) -> Dispatch:
        """Cancel a `queued` dispatch at once; flag an in-flight one; raise `NotFound`."""
        params = {"id": dispatch_id, "now": to_db_time(now), "error": CANCELLED_BEFORE_START}
        async with self._transaction() as tx:
            rows = await tx.run("request_cancel", params)
            if not rows:
                rows = await tx.run("get_dispatch", {"id": dispatch_id})
        if not rows:
            raise NotFound(f"no dispatch with id {dispatch_id}")
        dispatch = dispatch_from_row(rows[0])
        if dispatch.cancel_requested:
            self._wake_daemon()  # it is in flight: the daemon stops it at once
        return dispatch

    async def cancel_requests(self, dispatch_ids: Collection[int]) -> list[int]:
        """Which of these dispatches have a pending cancel request (ascending ids)."""
        if not dispatch_ids:
            return []
        rows = await self._run("cancel_requests", {"ids": _json_list(dispatch_ids)})
        return [row["id"] for row in rows]

    # -- attempts ---------------------------------------------------------------------

    async def flush(self) -> None:
        """Commit what is queued; return once it is durable."""
        await self._call(_nothing)

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
        """Queue the insert of a `running` attempt row; return the id it will have.

        Ids come from a counter read once from the table (the instance lock makes this
        daemon the only one writing attempts), so nothing waits for the insert.
        """
        if self._next_attempt_id is None:
            rows = await self._run("max_attempt_id")
            if self._next_attempt_id is None:  # not set by a concurrent first call
                self._next_attempt_id = int(rows[0]["id"]) + 1
        attempt_id = self._next_attempt_id
        self._next_attempt_id += 1
        params = {
            "id": attempt_id,
            "dispatch_id": dispatch_id,
            "step_index": step_index,
            "step": step,
            "runner": runner,
            "attempt": attempt,
            "instance_id": instance_id,
            "now": to_db_time(now),
        }
        start_sql, done_sql = query("start_attempt"), query("insert_finished_attempt")
        ends = self._attempt_ends

        def insert(db: sqlite3.Connection) -> None:
            end = ends.pop(attempt_id, None)
            if end is None:
                db.execute(start_sql, params)
            else:  # the attempt ended before its row was written: one row, complete
                db.execute(done_sql, {**params, **end})

        self._writer.post(insert)
        return attempt_id

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
        end = {
            "status": str(status),
            "ended_at": to_db_time(now),
            "exit_code": exit_code,
            "error": error,
            "output": output,
        }
        sql = query("finish_attempt")
        ends = self._attempt_ends
        ends.setdefault(attempt_id, end)  # a second end changes nothing (as in the SQL)

        def update(db: sqlite3.Connection) -> None:
            # Whichever of the insert and this pops the end writes it (dict.pop is
            # atomic): written once, by the insert when it had not run yet.
            popped = ends.pop(attempt_id, None)
            if popped is not None:
                db.execute(sql, {"id": attempt_id, **popped})

        self._writer.post(update)

    async def step_attempts(self, dispatch_id: int, step_index: int) -> list[Attempt]:
        """Every attempt of one step, oldest first."""
        rows = await self._run(
            "step_attempts", {"dispatch_id": dispatch_id, "step_index": step_index}
        )
        return [attempt_from_row(row) for row in rows]

    # -- reading ----------------------------------------------------------------------

    async def get_dispatch(self, dispatch_id: int) -> Dispatch | None:
        """One dispatch, or None."""
        rows = await self._run("get_dispatch", {"id": dispatch_id})
        return dispatch_from_row(rows[0]) if rows else None

    async def list_dispatches(
        self, status: DispatchStatus | None = None, limit: int = 50
    ) -> list[Dispatch]:
        """Newest first."""
        if status is None:
            rows = await self._run("list_dispatches", {"limit": limit})
        else:
            rows = await self._run(
                "list_dispatches_by_status", {"status": str(status), "limit": limit}
            )
        return [dispatch_from_row(row) for row in rows]

    async def list_attempts(self, dispatch_id: int) -> list[Attempt]:
        """Oldest first."""
        rows = await self._run("list_attempts", {"dispatch_id": dispatch_id})
        return [attempt_from_row(row) for row in rows]

    async def count_by_status(self) -> dict[DispatchStatus, int]:
        """Dispatches per status; every status is present (0 when none)."""
        counts = dict.fromkeys(DispatchStatus, 0)
        for row in await self._run("count_by_status"):
            counts[DispatchStatus(row["status"])] = row["n"]
        return counts

    # -- gate mirror ------------------------------------------------------------------

    async def open_slot(self, gate: str, holder: str, instance_id: str, now: datetime) -> int:
        """Insert a held `gates` row and return its id."""
        params = {"gate": gate, "holder": holder, "instance_id": instance_id}
        rows = await self._run("open_slot", {**params, "now": to_db_time(now)})
        slot_id: int = rows[0]["id"]
        return slot_id

    async def close_slot(self, slot_id: int, now: datetime) -> bool:
        """Stamp `released_at` on a held row; False when it was already released."""
        rows = await self._run("close_slot", {"id": slot_id, "now": to_db_time(now)})
        return len(rows) == 1

    def mirror_open(self, gate: str, holder: str, instance_id: str, now: datetime) -> SlotHandle:
        """Queue the insert of a held row; the handle learns its id when it is written."""
        handle = SlotHandle(gate, holder)
        sql = query("mirror_open")
        params: dict[str, Any] = {"gate": gate, "holder": holder, "instance_id": instance_id}
        params["now"] = to_db_time(now)

        releases = self._slot_releases

        def insert(db: sqlite3.Connection) -> None:
            # Released before its row was written: one row, with both times.
            params["released_at"] = releases.pop(handle, None)
            handle.row_id = db.execute(sql, params).fetchall()[0]["id"]

        self._writer.post(insert)
        return handle

    def mirror_close(self, handle: SlotHandle, now: datetime) -> None:
        """Queue the release of the row (after its insert: the queue keeps order)."""
        sql = query("mirror_close")
        released_at = to_db_time(now)
        releases = self._slot_releases
        releases.setdefault(handle, released_at)

        def release(db: sqlite3.Connection) -> None:
            # As for attempts: the insert or this, whichever pops first, writes it.
            popped = releases.pop(handle, None)
            if popped is not None and handle.row_id is not None:
                db.execute(sql, {"id": handle.row_id, "now": popped})

        self._writer.post(release)

    async def held_slots(self) -> list[SlotRow]:
        """Every row with `released_at` NULL, oldest first."""
        return [slot_from_row(row) for row in await self._run("held_slots")]

    async def gate_row_counts(self) -> GateRowCounts:
        """How many `gates` rows are held and how many released."""
        row = (await self._run("gate_row_counts"))[0]
        return GateRowCounts(held=row["held"], released=row["released"])

    # -- purge and retention ----------------------------------------------------------

    async def purge_released(self, before: datetime, batch_size: int) -> int:
        """Delete one batch of gate rows released before `before`, oldest first."""
        params = {"before": to_db_time(before), "batch_size": batch_size}
        return await self._run_count("purge_released", params)

    async def count_purgeable(self, before: datetime) -> int:
        """How many gate rows were released before `before`."""
        rows = await self._run("count_purgeable", {"before": to_db_time(before)})
        count: int = rows[0]["n"]
        return count

    async def purge_finished_dispatches(
        self, before: datetime, batch_size: int
    ) -> ExpiredDispatches:
        """Delete one batch of final dispatches finished before `before`, with attempts."""
        params = {"before": to_db_time(before), "batch_size": batch_size}
        async with self._transaction() as tx:
            attempts = await tx.count("retention_attempts", params)
            dispatches = await tx.count("retention_dispatches", params)
        return ExpiredDispatches(dispatches=dispatches, attempts=attempts)

    async def count_expired_dispatches(self, before: datetime) -> ExpiredDispatches:
        """How many final dispatches finished before `before`, and their attempts."""
        row = (await self._run("count_expired", {"before": to_db_time(before)}))[0]
        return ExpiredDispatches(dispatches=row["dispatches"], attempts=row["attempts"])

    async def reclaim_space(self) -> int:
        """One `incremental_vacuum` step; how many free pages went back to the system."""
        with self._wrap():
            freed: int = await self._writer.outside_transaction(_incremental_vacuum)
        return freed

    async def optimize(self) -> None:
        """`PRAGMA optimize`: re-analyse the tables whose statistics went stale."""
        await self._run("optimize")

    # -- lifecycle --------------------------------------------------------------------

    async def recover(self, instance_id: str, now: datetime) -> RecoveryReport:
        """Undo, in one transaction, what instances other than `instance_id` left open."""
        params = {"instance_id": instance_id, "now": to_db_time(now)}
        async with self._transaction() as tx:
            slots = await tx.run("recover_slots", params)
            attempts = await tx.run("recover_attempts", params)
            dispatches = await tx.run("recover_dispatches", params)
        return RecoveryReport(
            slots_released=len(slots),
            attempts_interrupted=len(attempts),
            dispatches_requeued=len(dispatches),
        )

    async def register_instance(self, instance: Instance) -> None:
        """Insert the row of a starting daemon."""
        await self._run(
            "register_instance",
            {
                "id": instance.id,
                "hostname": instance.hostname,
                "pid": instance.pid,
                "version": instance.version,
                "started_at": to_db_time(instance.started_at),
                "heartbeat_at": to_db_time(instance.heartbeat_at),
                "stopped_at": _db_time_or_none(instance.stopped_at),
            },
        )

    async def heartbeat(self, instance_id: str, now: datetime) -> None:
        """Stamp `heartbeat_at`."""
        await self._run("heartbeat", {"id": instance_id, "now": to_db_time(now)})

    async def stop_instance(self, instance_id: str, now: datetime) -> None:
        """Stamp `stopped_at` (once)."""
        await self._run("stop_instance", {"id": instance_id, "now": to_db_time(now)})

    async def live_instances(self, since: datetime) -> list[Instance]:
        """Instances not stopped whose heartbeat is at or after `since`."""
        rows = await self._run("live_instances", {"since": to_db_time(since)})
        return [instance_from_row(row) for row in rows]

    # -- several daemons (issue 8) ----------------------------------------------------

    async def try_take_slot(
        self, gate: str, holder: str, instance_id: str, capacity: int, now: datetime
    ) -> int | None:
        """Insert a held row only while fewer than `capacity` of `gate` are held."""
        params = {"gate": gate, "holder": holder, "instance_id": instance_id}
        async with self._transaction() as tx:
            held: int = (await tx.run("gate_held_count", {"gate": gate}))[0]["n"]
            if held >= capacity:
                return None
            rows = await tx.run("open_slot", {**params, "now": to_db_time(now)})
        slot_id: int = rows[0]["id"]
        return slot_id

    async def reap_dead_instances(
        self, instance_id: str, now: datetime, ttl: float
    ) -> RecoveryReport:
        """Recovery for instances other than `instance_id` silent for over `ttl` seconds."""
        params = {
            "keep": instance_id,
            "now": to_db_time(now),
            "since": to_db_time(now - timedelta(seconds=ttl)),
        }
        async with self._transaction() as tx:
            slots = await tx.run("reap_slots", params)
            attempts = await tx.run("reap_attempts", params)
            dispatches = await tx.run("reap_dispatches", params)
            await tx.run("reap_instances", params)
        return RecoveryReport(
            slots_released=len(slots),
            attempts_interrupted=len(attempts),
            dispatches_requeued=len(dispatches),
        )

    @asynccontextmanager
    async def maintenance_lock(self, name: str) -> AsyncIterator[bool]:
        """Always granted: the instance lock already makes this daemon the only one."""
        yield True

    async def subscribe(self, on_change: Callable[[], None]) -> None:
        """Call `on_change` when another process submits to this file or asks to cancel
        (`dispatcher.wake`). Polling stays the fallback: a lost wake-up only delays."""
        listener = wake.Listener(self._path, on_change)
        try:
            listener.start()
        except OSError as exc:
            raise StoreError(f"cannot listen for wake-ups on {self._path}: {exc}") from exc
        self._listener = listener


class _Tx:
    """Statements inside one open exclusive transaction."""

    def __init__(self, run: Callable[..., Any]) -> None:
        self._run = run

    async def run(self, name: str, params: Params | None = None) -> list[sqlite3.Row]:
        """One named statement, all rows fetched (so the statement is reset)."""
        sql = query(name)
        bound = params or {}
        rows: list[sqlite3.Row] = await self._run(lambda db: db.execute(sql, bound).fetchall())
        return rows

    async def count(self, name: str, params: Params) -> int:
        """One named write statement; the rows it changed."""
        sql = query(name)
        count: int = await self._run(lambda db: max(db.execute(sql, params).rowcount, 0))
        return count

    async def apply(self, migration: Migration) -> None:
        """Every statement of a migration, then its version row."""
        for statement in migration.statements():
            await self._run(lambda db, sql=statement: db.execute(sql).fetchall())
        now = to_db_time(datetime.now(UTC))
        await self.run("migrations_record", {"version": migration.version, "now": now})


def _reserve(db: sqlite3.Connection, new: NewDispatch, now: datetime) -> Reservation:
    """Insert unless the key is taken; a taken key must carry the same fingerprint."""
    rows = db.execute(query("insert_dispatch"), _new_dispatch_params(new, now)).fetchall()
    if rows:
        return Reservation(id=rows[0]["id"], status=DispatchStatus(rows[0]["status"]), created=True)
    assert new.key is not None, "only a keyed insert can conflict"
    existing = db.execute(query("dispatch_by_key"), {"key": new.key}).fetchall()[0]
    if existing["fingerprint"] != new.fingerprint:
        raise KeyConflict(new.key, existing["id"])
    return Reservation(id=existing["id"], status=DispatchStatus(existing["status"]), created=False)
