"""One thread, one `sqlite3` connection, work in batches: the SQLite store's engine.

An await that hops to a worker thread per statement (what aiosqlite does) costs about
130 µs here, against about 20 µs for the statement itself. So the store queues its
work to one thread that runs everything waiting in one transaction and wakes all the
waiting callers with one hop back to the loop:

- `call(fn)`: run `fn(connection)` in the next batch; the await returns once the batch
  has committed (durable) and answers fn's result or raises its exception. A failing
  job never undoes its neighbours: a single statement is atomic by itself, and a job
  of several statements (`atomic=True`) runs under its own SAVEPOINT.
- `post(fn)`: the same without waiting (gate mirror rows: recovery at start releases
  every open row, so they need no durability before the caller proceeds). Jobs run in
  the order they were queued, so a later `call` commits every earlier `post`, except:
- `call(fn, first=True)`: runs ahead of the posts queued with it, in a transaction of
  its own (the claim: the loop waits for it, while the writes of the dispatches it
  has just run have nobody waiting).
- `exclusive()`: a transaction of several awaited statements (read-modify-write) that
  nothing else interleaves with: the thread finishes its batch, runs `BEGIN IMMEDIATE`
  and then only this transaction's statements until it commits or rolls back.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# stdlib logging for busy waits: the daemon routes it into its JSON stream; the CLI,
# which configures no logging, stays silent.
store_log = logging.getLogger("dispatcher.store")
store_log.addHandler(logging.NullHandler())

BUSY_BACKOFF_MAX = 0.25
"""Longest pause between two tries of a BEGIN that found the database busy."""

T = TypeVar("T")
Fn = Callable[[sqlite3.Connection], Any]

MAX_BATCH = 512
"""A batch takes no more from the queue once it has this many jobs: bounds the time the
write lock is held. (One turn of the loop's queued writes arrive as one item, so a
batch can pass it by that many.)"""


_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite gave up waiting for a lock held by another connection."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _BUSY_CODES  # extended codes keep the primary in the low byte
    text = str(exc).lower()
    return "locked" in text or "busy" in text


@dataclass(eq=False, slots=True)
class _Job:
    fn: Fn
    future: asyncio.Future[Any] | None
    write: bool = True
    atomic: bool = False
    """Runs several statements: wrap it in a SAVEPOINT so a failure undoes all of them.
    (One statement is atomic by itself: a failing statement changes nothing.)"""
    first: bool = False
    """Runs ahead of the posts it was queued with, in a transaction of its own (see
    `SQLiteWriter.call`)."""


@dataclass(eq=False)
class _Exclusive:
    """A transaction the thread serves alone, statement by statement."""

    started: asyncio.Future[None]
    statements: queue.SimpleQueue[_Job | _End] = field(default_factory=queue.SimpleQueue)


@dataclass(eq=False, slots=True)
class _End:
    """Ends an exclusive transaction: commit (answering `future`) or roll back."""

    commit: bool
    future: asyncio.Future[None] | None = None


@dataclass(eq=False, slots=True)
class _Raw:
    fn: Fn
    future: asyncio.Future[Any]


_STOP = object()


class SQLiteWriter:
    """Owns the connection and its thread; see the module docstring."""

    def __init__(self, path: Path, busy_timeout: float, busy_patience: float | None = None) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._busy_patience = busy_timeout if busy_patience is None else busy_patience
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connection: sqlite3.Connection | None = None
        self._posted: list[_Job] = []
        self.closed = False

    async def start(self) -> None:
        """Connect in the thread; raises the connect error (sqlite3.Error) if any."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), name="dispatcher-sqlite", daemon=True
        )
        self._thread.start()
        await ready

    async def call(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        write: bool = True,
        atomic: bool = False,
        first: bool = False,
    ) -> T:
        """Run fn in the next batch; return its result once the batch has committed.

        `atomic`: fn runs several statements that must stand or fall together.
        `first`: fn runs before the posts queued with it, and commits on its own: its
        caller waits while nobody waits for them. Only for a statement whose result no
        queued post can change (the claim reads queued dispatches; posts write running
        ones, attempts and gate rows). Calls keep their order among themselves.
        """
        future = self._running_loop().create_future()
        self._hand_over()
        self._queue.put(_Job(fn, future, write, atomic, first))
        result: T = await future
        return result

    def post(self, fn: Fn) -> None:
        """Queue fn to run in order, without waiting for it.

        Posts collect on the loop's side and go to the thread together, once per turn
        of the loop (or before the next awaited job): one hand-over and one wake-up of
        the thread for many writes, instead of a tug of war over the GIL for each.
        """
        if self.closed:
            return
        self._posted.append(_Job(fn, None, True))
        if len(self._posted) == 1:
            self._running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        if self._posted:
            self._queue.put(self._posted)
            self._posted = []

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Callable[..., Any]]:
        """`BEGIN IMMEDIATE` ... COMMIT; the body awaits `run(fn)` per statement.

        Rolled back on any exception, cancellation included.
        """
        loop = self._running_loop()
        tx = _Exclusive(started=loop.create_future())
        self._hand_over()
        self._queue.put(tx)

        async def run(fn: Fn) -> Any:
            future = loop.create_future()
            tx.statements.put(_Job(fn, future))
            return await future

        try:
            # Inside the try: if we are cancelled while the thread begins, it must
            # still find the rollback, or it would wait for statements for ever.
            await tx.started
            yield run
        except BaseException:
            tx.statements.put(_End(commit=False))
            raise
        done: asyncio.Future[None] = loop.create_future()
        tx.statements.put(_End(commit=True, future=done))
        await done

    async def outside_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn between batches with no transaction open (PRAGMAs that need that)."""
        future = self._running_loop().create_future()
        self._hand_over()
        self._queue.put(_Raw(fn, future))
        result: T = await future
        return result

    async def close(self) -> None:
        """Run what is queued, close the connection, end the thread (idempotent)."""
        if self.closed or self._thread is None:
            self.closed = True
            return
        self.closed = True
        self._hand_over()
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # -- the thread ------------------------------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self.closed or self._loop is None:
            raise sqlite3.ProgrammingError("the store is closed")
        return self._loop

    def _main(self, ready: asyncio.Future[None]) -> None:
        try:
            self._connection = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=256,
            )
            self._connection.row_factory = sqlite3.Row
        except sqlite3.Error as exc:
            self._deliver([(ready, exc, False)])
            return
        self._deliver([(ready, None, True)])
        try:
            self._serve(self._connection)
        finally:
            self._connection.close()

    def _serve(self, connection: sqlite3.Connection) -> None:
        pending: Any = None
        while True:
            item = pending if pending is not None else self._queue.get()
            pending = None
            if item is _STOP:
                return
            if isinstance(item, _Exclusive):
                self._serve_exclusive(connection, item)
                continue
            if isinstance(item, _Raw):
                self._settle([self._run_job(connection, _Job(item.fn, item.future), False)])
                continue
            batch, pending = self._collect(item if isinstance(item, list) else [item])
            ahead = [job for job in batch if job.first]
            if ahead:
                self._run_batch(connection, ahead)
                batch = [job for job in batch if not job.first]
            if batch:
                self._run_batch(connection, batch)

    def _collect(self, batch: list[_Job]) -> tuple[list[_Job], Any]:
        """Add the jobs waiting behind the batch's first; answer the batch and the item
        that ended it (served next), if any."""
        while len(batch) < MAX_BATCH:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(nxt, list):
                batch.extend(nxt)
            elif isinstance(nxt, _Job):
                batch.append(nxt)
            else:
                return batch, nxt
        return batch, None

    def _run_batch(self, connection: sqlite3.Connection, batch: list[_Job]) -> None:
        write = any(job.write for job in batch)
        try:
            self._begin(connection, "BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            self._settle([(job, exc, False) for job in batch])
            return
        results = [self._run_job(connection, job, job.atomic) for job in batch]
        try:
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(connection)
            results = [(job, exc, False) for job in batch]
        self._settle(results)

    @staticmethod
    def _run_job(
        connection: sqlite3.Connection, job: _Job, savepoint: bool
    ) -> tuple[_Job, Any, bool]:
        if savepoint:
            connection.execute("SAVEPOINT job")
        try:
            value = job.fn(connection)
        except Exception as exc:
            if savepoint:
                connection.execute("ROLLBACK TO job")
                connection.execute("RELEASE job")
            return job, exc, False
        if savepoint:
            connection.execute("RELEASE job")
        return job, value, True

    def _serve_exclusive(self, connection: sqlite3.Connection, tx: _Exclusive) -> None:
        try:
            self._begin(connection, "BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._deliver([(tx.started, exc, False)])
            return
        self._deliver([(tx.started, None, True)])
        while True:
            item = tx.statements.get()
            if isinstance(item, _Job):
                self._settle([self._run_job(connection, item, savepoint=False)])
                continue
            outcome: tuple[Any, bool] = (None, True)
            if item.commit:
                try:
                    connection.execute("COMMIT")
                except sqlite3.Error as exc:
                    outcome = (exc, False)
            _rollback(connection)
            if item.future is not None:
                self._deliver([(item.future, *outcome)])
            return

    def _begin(self, connection: sqlite3.Connection, statement: str) -> None:
        """BEGIN, tried again with backoff while the database is busy, up to the patience.

        SQLite's busy handler already waited `busy_timeout` inside each try; it is not
        called at all in some cases (WAL recovery, a lock upgrade), hence the loop. A
        BEGIN that fails changes nothing, so trying again is safe.
        """
        started = time.monotonic()
        delay, tries, next_log = 0.005, 0, 0.0
        while True:
            try:
                connection.execute(statement)
            except sqlite3.OperationalError as exc:
                waited = time.monotonic() - started
                if not is_busy(exc) or waited + delay > self._busy_patience:
                    raise
                tries += 1
                if waited >= next_log:  # at the first busy, then once per busy timeout
                    self._log_busy(exc, waited, tries)
                    next_log = waited + max(self._busy_timeout, 1.0)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, BUSY_BACKOFF_MAX)
                continue
            if tries:
                waited_ms = round((time.monotonic() - started) * 1000)
                store_log.info("database_available", extra={"waited_ms": waited_ms, "tries": tries})
            return

    def _log_busy(self, exc: sqlite3.Error, waited: float, tries: int) -> None:
        fields = {
            "database": str(self._path),
            "error": str(exc),
            "waited_ms": round(waited * 1000),
            "tries": tries,
            "patience_ms": round(self._busy_patience * 1000),
        }
        store_log.warning("database_busy", extra=fields)

    def _settle(self, results: list[tuple[_Job, Any, bool]]) -> None:
        delivered = []
        for job, value, ok in results:
            if job.future is not None:
                delivered.append((job.future, value, ok))
            elif not ok:
                fields = {"database": str(self._path), "error": str(value)}
                store_log.error("store_write_failed", extra=fields)
        if delivered:
            self._deliver(delivered)

    def _deliver(self, results: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_resolve, results)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting any more
            pass


def _rollback(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        connection.execute("ROLLBACK")


def _resolve(results: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    for future, value, ok in results:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
