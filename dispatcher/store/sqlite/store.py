"""The SQLite store: the `Store` base on one aiosqlite connection in WAL mode.

aiosqlite runs the connection on a thread of its own; every statement is one await. So
the statements of one use of the connection go through a lock that only the event
loop's thread touches (FIFO: uses keep their order), and the queued writes of the base
go out as one transaction a batch: `BEGIN IMMEDIATE` and one statement per kind of
write with all of its rows (`<kind>_rows` in statements.sql), sent together so that the
thread runs them back to back while the loop goes on, then `COMMIT` once all of them
succeeded. A
read-modify-write runs as its own `BEGIN IMMEDIATE` transaction: in WAL mode a
deferred transaction that upgrades from read to write fails with SQLITE_BUSY_SNAPSHOT,
which no busy timeout can wait out. Other processes (the CLI beside the daemon) are
serialized by SQLite's own lock and `busy_timeout`; a statement that still fails as
busy is tried again with backoff until `busy_patience` has passed. Driver errors
become the package's own exceptions here (`wrap_exceptions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from dispatcher import logs, wake
from dispatcher.errors import (
    DatabaseCorrupt,
    DispatcherError,
    NoDatabase,
    StoreBusy,
    StoreError,
    StoreUnwritable,
)
from dispatcher.store.base import Access, Migration, Row, Store, as_sent
from dispatcher.store.sql import statements
from dispatcher.store.writes import FIELDS, WriteBatch

log = logs.get_logger("dispatcher.store")

T = TypeVar("T")

MIN_SQLITE = (3, 35, 0)
"""RETURNING (3.35) and json_each (built in since 3.38, usually present before)."""

BUSY_BACKOFF_MAX = 0.25
"""Longest pause between two tries of a statement that found the database busy."""

ROWS_PER_STATEMENT = 32
"""Rows of one kind in one statement of a batch (a larger batch sends more than one):
at most 32 texts a kind for the connection's statement cache."""

CHECK_BUDGET = 10.0
"""Seconds the check at start may take: a larger database is checked in part."""

RECOVER_HINT = (
    "stop the daemon, keep a copy of the file, then either restore a backup or salvage "
    "it with `sqlite3 FILE .recover | sqlite3 NEW` and point [database] path at NEW"
)


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


# -- driver errors -------------------------------------------------------------------------

_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_UNWRITABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PERM,
    }
)
_FULL_HINT = " (is the disk full or the file size limited? nothing half-written was kept)"


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # extended codes keep the primary low


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite gave up waiting for a lock held by another connection."""
    code = _primary_code(exc)
    if code is not None:
        return code in _BUSY_CODES
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def translate(exc: sqlite3.Error, path: Path, doing: str = "use") -> DispatcherError:
    """The package's own exception for a driver error."""
    code = _primary_code(exc)
    if is_busy(exc):
        return StoreBusy(f"database {path} is busy: {exc}; try again")
    if code == sqlite3.SQLITE_NOTADB:
        return DatabaseCorrupt(
            f"cannot {doing} database {path}: {exc} (a wrong path, or a damaged file: "
            f"{RECOVER_HINT})"
        )
    if code in _CORRUPT_CODES or "malformed" in str(exc):
        return DatabaseCorrupt(f"database {path} is damaged ({exc}): {RECOVER_HINT}")
    if code in _UNWRITABLE_CODES:
        hint = _FULL_HINT if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR) else ""
        return StoreUnwritable(f"cannot {doing} database {path}: {exc}{hint}")
    return StoreError(f"cannot {doing} database {path}: {exc}")


@contextmanager
def wrap_exceptions(path: Path, doing: str = "use") -> Iterator[None]:
    """Turn `sqlite3` errors into `StoreBusy`, `StoreUnwritable`, `DatabaseCorrupt` or
    `StoreError`."""
    try:
        yield
    except sqlite3.Error as exc:
        raise translate(exc, path, doing) from exc
    except ValueError as exc:  # aiosqlite: "Connection closed"
        raise StoreError(f"database {path}: the store is closed") from exc


def split_statements(script: str) -> list[str]:
    """Split a SQL script on statement ends, as SQLite's own tokenizer sees them."""
    found: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            found.append(buffer.strip())
            buffer = ""
    rest = [ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if rest:
        raise ValueError(f"incomplete SQL statement at the end: {buffer.strip()[:60]!r}")
    return found


def rows_statement(name: str, body: str, count: int) -> str:
    """`body`, a `<name>_rows` statement of statements.sql, with `count` rows of the
    fields of `name` (`writes.FIELDS`, in that order) in front as `r`."""
    fields = FIELDS[name]
    row = "(" + ", ".join("?" * len(fields)) + ")"
    return f"WITH r ({', '.join(fields)}) AS (VALUES {', '.join([row] * count)})\n{body}"


# -- the store -------------------------------------------------------------------------------


class SQLiteStore(Store):
    """The `Store` on a SQLite file in WAL mode. Create it with `await SQLiteStore.open()`."""

    shared = False
    """One daemon per file (the instance lock): the in-memory gate alone decides."""

    migrations = "dispatcher.store.sqlite"

    def __init__(self, db: aiosqlite.Connection, path: Path, patience: float) -> None:
        super().__init__(str(path))
        self._db = db
        self._path = path
        self._patience = patience
        self._sql = statements("dispatcher.store.sqlite")
        self._lock = asyncio.Lock()
        """One use of the connection at a time (a statement, a transaction, a batch)."""
        self._riders: list[tuple[str, Any, asyncio.Future[list[Row]]]] | None = None
        """Statements waiting to go out with the batch that holds the connection, before
        its COMMIT (None: no batch is open to them)."""
        self._rows_sql: dict[tuple[str, int], str] = {}
        """Batch statements by kind and number of rows (at most `ROWS_PER_STATEMENT`)."""
        self._listener: wake.Listener | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout_ms: int = 5000,
        busy_patience: float | None = None,
        mode: Access = Access.CREATE,
        config: Path | None = None,
    ) -> SQLiteStore:
        """Connect, configure (WAL, foreign keys, busy timeout) and migrate forward.

        `busy_patience` (seconds, default: the busy timeout) bounds how long one call
        keeps trying while the database is busy before it raises `StoreBusy`. `mode`
        says whether a missing file is created (`CREATE`), refused (`WRITE`; exit 66
        naming `config`, the file the path came from), or the database only read.
        """
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old: dispatcher needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer"
            )
        path = Path(path)
        _prepare(path, mode, config)
        busy_timeout = busy_timeout_ms / 1000
        patience = busy_timeout if busy_patience is None else busy_patience
        if mode is not Access.READ:
            return await cls._connect(path, path, busy_timeout, patience, mode)
        uri = f"{path.resolve().as_uri()}?mode=ro"
        try:
            return await cls._connect(path, uri, busy_timeout, patience, mode)
        except StoreUnwritable:
            if os.path.exists(f"{path}-wal"):  # noqa: ASYNC240 - one stat, at open
                raise
        # A read-only folder and no -wal file: SQLite cannot make the shared-memory file
        # a WAL reader needs, and no writer can start here either (it would need that
        # file too), so the database cannot change while we read: open it immutable.
        return await cls._connect(path, uri + "&immutable=1", busy_timeout, patience, mode)

    @classmethod
    async def _connect(
        cls, path: Path, target: str | Path, busy_timeout: float, patience: float, mode: Access
    ) -> SQLiteStore:
        connection = aiosqlite.connect(
            target,
            timeout=busy_timeout,
            isolation_level=None,
            cached_statements=256,
            uri=isinstance(target, str),
        )
        with wrap_exceptions(path, "open"):
            try:
                db = await connection
            except BaseException:
                # After a failed connect aiosqlite stops its thread without waiting for
                # it; wait here, so that it never answers a loop that is gone.
                await asyncio.to_thread(connection._thread.join, 5)
                raise
        db.row_factory = sqlite3.Row
        store = cls(db, path, patience)
        try:
            await store._configure(mode)
            if mode is not Access.READ:
                await store._migrate()
            else:
                await store._check_version()
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._db.close()

    # -- opening --------------------------------------------------------------------------

    async def _configure(self, mode: Access) -> None:
        if mode is Access.READ:
            await self._raw(lambda: self._db.execute("PRAGMA query_only = ON"), "open")
            return
        if mode is Access.CREATE:
            # Before WAL and before any table: only then does a new database take it.
            await self._raw(lambda: self._db.execute(self._sql["auto_vacuum_incremental"]), "open")
        await self._enable_wal()
        await self._raw(lambda: self._db.execute("PRAGMA synchronous = NORMAL"), "open")
        await self._raw(lambda: self._db.execute("PRAGMA foreign_keys = ON"), "open")

    async def _enable_wal(self) -> None:
        """Switch to WAL, retrying while another connection holds the file.

        SQLite does not call the busy handler for a journal-mode change, so two
        processes opening a new database at once (the daemon and a `submit`) would
        otherwise see "database is locked" at once instead of waiting.
        """
        await self._busy_retry(
            lambda: self._db.execute_fetchall("PRAGMA journal_mode = WAL"), "open", self._patience
        )

    async def _check_version(self) -> None:
        """A read-only opening migrates nothing: refuse a schema this code cannot read."""
        tables = await self._raw(
            lambda: self._db.execute_fetchall(
                "SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'"
            ),
            "read",
        )
        if not tables:
            raise StoreError(f"database {self._path} has no dispatcher tables yet")
        await self._check_schema()

    async def check(self, *, full: bool = False, budget: float | None = CHECK_BUDGET) -> str:
        """`PRAGMA quick_check` (or the full `integrity_check`), stopped after `budget`
        seconds; answers "ok", "partial" (the budget ran out first) or raises
        `DatabaseCorrupt` naming the first problem."""
        pragma = "PRAGMA integrity_check(1)" if full else self._sql["quick_check"]
        deadline = None if budget is None else time.monotonic() + budget
        stopped = False

        def over_budget() -> int:
            nonlocal stopped
            stopped = deadline is not None and time.monotonic() > deadline
            return 1 if stopped else 0

        await self._db.set_progress_handler(over_budget, 10_000)
        try:
            async with self._lock:
                rows = await self._db.execute_fetchall(pragma)
        except sqlite3.OperationalError as exc:
            if stopped:
                return "partial"
            raise translate(exc, self._path, "check") from exc
        except sqlite3.DatabaseError as exc:
            raise translate(exc, self._path, "check") from exc
        finally:
            await self._db.set_progress_handler(None, 0)  # type: ignore[arg-type]  # None clears it
        found = [str(row[0]) for row in rows]
        verdict = "; ".join(line.strip() for text in found for line in text.splitlines()) or "ok"
        if verdict != "ok":
            raise DatabaseCorrupt(f"database {self._path} is damaged ({verdict}): {RECOVER_HINT}")
        return "ok"

    # -- primitives -------------------------------------------------------------------------

    async def _execute(self, name: str, params: Mapping[str, Any], *, first: bool) -> list[Row]:
        sql = self._sql[name]
        sent = as_sent(params)
        if self._riders is not None:  # a batch holds the connection: go out with it
            ride: asyncio.Future[list[Row]] = asyncio.get_running_loop().create_future()
            self._riders.append((sql, sent, ride))
            try:
                return await ride
            except _RideAgain:
                pass  # the batch failed: this statement's work was undone with it
        async with self._lock:
            rows = await self._busy_retry(lambda: self._db.execute_fetchall(sql, sent))
        return list(rows)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Tx]:
        async with self._lock:
            try:
                # Inside the try: cancelled while BEGIN runs, it must still be rolled back.
                await self._busy_retry(lambda: self._db.execute("BEGIN IMMEDIATE"))
                yield _Tx(self)
            except BaseException:
                await self._rollback()
                raise
            try:
                with wrap_exceptions(self._path):
                    await self._db.commit()
            except BaseException:
                await self._rollback()
                raise

    async def _write_batch(self, writes: WriteBatch, fence: str | None) -> None:
        """BEGIN, the batch's statements, its riders, COMMIT.

        Sent at once: the connection's thread runs the statements back to back while
        the loop goes on, with no turn of the loop between two of them. A statement
        asked for meanwhile (`_execute`: the dispatch loop's next claim, as the
        dispatches of the last one end) rides in the same transaction, sent with the
        COMMIT instead of one round trip after it; its caller sees its answer only once
        the COMMIT has succeeded, so nothing is acted on that a failed COMMIT undid.
        """
        # No fence: one daemon per file (the instance lock) owns all of its work.
        db = self._db
        async with self._lock:
            self._riders = []
            try:
                with wrap_exceptions(self._path, "write"):
                    calls = [db.execute("BEGIN IMMEDIATE")]
                    for name, rows in writes:
                        for sql, values in self._rows_statements(name, rows):
                            calls.append(db.executemany(sql, self._in_transaction(values)))
                    results = await asyncio.gather(*calls, return_exceptions=True)
                    for result in results:  # the first failure is the cause; see below
                        if isinstance(result, BaseException):
                            raise result
                    # A rider whose caller was cancelled meanwhile is not sent: nobody
                    # would act on what it did (a claim's dispatches would sit claimed).
                    riders = [rider for rider in self._riders if not rider[2].done()]
                    self._riders = None
                    answers = await asyncio.gather(
                        *(db.execute_fetchall(sql, sent) for sql, sent, _ in riders),
                        db.execute("COMMIT"),  # not commit(): it says so if nothing was open
                        return_exceptions=True,
                    )
                    if isinstance(answers[-1], BaseException):
                        self._riders = riders  # undone with the batch: each goes again alone
                        # The first failure is the cause: a rider that failed on a full
                        # disk ended the transaction, and the COMMIT only found it gone.
                        raise next(a for a in answers if isinstance(a, BaseException))
                    for (_, _, ride), answer in zip(riders, answers, strict=False):
                        self._answer(ride, answer)
            except BaseException:
                await self._rollback()
                raise
            finally:
                for _, _, ride in self._riders or ():
                    if not ride.done():
                        ride.set_exception(_RideAgain())
                self._riders = None

    def _answer(self, ride: asyncio.Future[list[Row]], answer: Any) -> None:
        """A rider's rows, or its own error (its statement alone was undone)."""
        if ride.done():  # its caller was cancelled
            return
        if isinstance(answer, sqlite3.Error):
            ride.set_exception(translate(answer, self._path))
        elif isinstance(answer, BaseException):
            ride.set_exception(answer)
        else:
            ride.set_result(list(answer))

    def _in_transaction(self, values: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
        """The one row of parameters of a batch statement, given only inside the batch's
        transaction (read on the connection's thread, as the statement starts).

        A statement sent together with its `BEGIN` runs even when that `BEGIN` failed
        (busy), or when SQLite rolled the transaction back by itself after an earlier
        statement failed (a full disk): it would then write its rows alone, outside any
        transaction, and the batch would land in part. Refused here, it writes nothing,
        and the batch fails with the first error, which is tried again as a whole.
        """
        if not self._db.in_transaction:
            raise _OutsideTransaction("the batch's transaction is not open")
        yield values

    def _rows_statements(
        self, name: str, rows: Sequence[Mapping[str, Any]]
    ) -> Iterator[tuple[str, tuple[Any, ...]]]:
        """`<name>_rows` with its rows in front as `VALUES`, `ROWS_PER_STATEMENT` at a
        time: (statement, parameters)."""
        fields = FIELDS[name]
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[start : start + ROWS_PER_STATEMENT]
            sql = self._rows_sql.get((name, len(chunk)))
            if sql is None:
                sql = rows_statement(name, self._sql[f"{name}_rows"], len(chunk))
                self._rows_sql[name, len(chunk)] = sql
            yield sql, tuple(row[field] for row in chunk for field in fields)

    async def _id_block(self, table: str) -> Iterator[int]:
        if table not in ("attempts", "gates"):
            raise ValueError(f"no ids are handed out for table {table!r}")
        rows = await self._execute("max_id", {"table": table}, first=True)
        return itertools.count(int(rows[0]["id"]) + 1)

    async def _apply_migration(self, tx: Any, migration: Migration) -> None:
        for statement in split_statements(migration.sql):
            with wrap_exceptions(self._path, "migrate"):
                await self._db.execute(statement)

    def _time(self, value: datetime) -> str:
        return to_db_time(value)

    def _from_time(self, value: Any) -> datetime:
        return from_db_time(value)

    def _list(self, values: Any) -> str:
        """One JSON array, expanded in SQL with `json_each`."""
        return json.dumps(list(values))

    # -- what only SQLite has ------------------------------------------------------------------

    async def trace(self, callback: Callable[[str], object] | None) -> None:
        """Call `callback` with the text of every statement the connection runs from now
        on, on the connection's thread (tests, debugging); None stops it."""
        await self._db.set_trace_callback(callback)  # type: ignore[arg-type]  # None: off

    async def reclaim_space(self) -> int:
        """One `incremental_vacuum` step; how many free pages went back to the system."""
        await self._writes.settle()
        async with self._lock:
            before = await self._raw(
                lambda: self._db.execute_fetchall(self._sql["freelist_count"]), "vacuum"
            )
            if next(iter(before))[0] == 0:
                return 0
            # executescript steps the PRAGMA to the end (see statements.sql).
            await self._raw(lambda: self._db.executescript(self._sql["incremental_vacuum"]))
            after = await self._raw(
                lambda: self._db.execute_fetchall(self._sql["freelist_count"]), "vacuum"
            )
        freed: int = next(iter(before))[0] - next(iter(after))[0]
        return max(freed, 0)

    async def subscribe(
        self,
        on_change: Callable[[], None],
        *,
        on_cancel: Callable[[], None] | None = None,
        on_released: Callable[[], None] | None = None,
    ) -> None:
        """Call `on_change` when another process submits to this file or asks to cancel
        (`dispatcher.wake`; a wake-up says no more). Polling stays the fallback: a lost
        wake-up only delays."""
        listener = wake.Listener(self._path, on_change)
        try:
            listener.start()
        except OSError as exc:
            raise StoreError(f"cannot listen for wake-ups on {self._path}: {exc}") from exc
        self._listener = listener

    def _submitted(self) -> None:
        """Tell the daemon on this file, unless that is us (the daemon's own API acts on
        it directly)."""
        if self._listener is None:
            wake.send(self._path)

    # -- plumbing ---------------------------------------------------------------------------

    async def _raw(self, make: Callable[[], Awaitable[T]], doing: str = "use") -> T:
        with wrap_exceptions(self._path, doing):
            return await make()

    async def _busy_retry(
        self, make: Callable[[], Awaitable[T]], doing: str = "use", patience: float | None = None
    ) -> T:
        """Run `make()`, again with backoff while SQLite answers busy, up to `patience`.

        SQLite's busy handler already waited `busy_timeout` inside each try; it is not
        called at all in some cases (WAL recovery, a lock upgrade), hence the loop. A
        statement that fails as busy changed nothing, so trying again is safe.
        """
        patience = self._patience if patience is None else patience
        started = time.monotonic()
        delay, tries, next_log = 0.005, 0, 0.0
        while True:
            try:
                result = await make()
            except sqlite3.Error as exc:
                waited = time.monotonic() - started
                if not is_busy(exc) or waited + delay > patience:
                    raise translate(exc, self._path, doing) from exc
                tries += 1
                if waited >= next_log:  # at the first busy, then once a second at most
                    log.warning(
                        "database_busy",
                        database=self.database,
                        error=str(exc),
                        waited_ms=round(waited * 1000),
                        patience_ms=round(patience * 1000),
                    )
                    next_log = waited + 1.0
            except ValueError as exc:  # aiosqlite: "Connection closed"
                raise StoreError(f"database {self._path}: the store is closed") from exc
            else:
                if tries:
                    waited_ms = round((time.monotonic() - started) * 1000)
                    log.info("database_free", database=self.database, waited_ms=waited_ms)
                return result
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, BUSY_BACKOFF_MAX)

    async def _rollback(self) -> None:
        """Roll back whatever is open; runs even when the caller is being cancelled."""
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._db.rollback())


class _RideAgain(Exception):
    """The batch a statement rode with failed: it goes out again on its own."""


class _OutsideTransaction(Exception):
    """A batch statement that would have run outside its batch's transaction."""


class _Tx:
    """Statements inside one open transaction (the store's lock is held)."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    async def fetch(self, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        store = self._store
        sql = store._sql[name]
        rows = await store._raw(lambda: store._db.execute_fetchall(sql, params or {}))
        return list(rows)


def _prepare(path: Path, mode: Access, config: Path | None) -> None:
    """Create the folder (CREATE), or refuse a database that is not there."""
    if mode is Access.CREATE:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StoreError(
                f"cannot open database {path}: cannot create folder {path.parent}: {reason}"
            ) from exc
        return
    if not path.exists():
        source = f" (from {config})" if config is not None else ""
        raise NoDatabase(
            f"no database at {path}{source}: start the daemon (`dispatcher run`) or "
            "create it with `dispatcher init`"
        )
