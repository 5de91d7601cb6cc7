"""Group commit on the event loop's side: queued writes, folded, written in batches.

The pipeline's outcome writes (attempt starts and ends, plan and step progress, final
statuses, gate mirror rows) need not be awaited one by one: a caller that needs one
durable awaits `flush()`. So they are queued here, and everything queued in one turn
of the loop goes to the database as one batch: one transaction, one `executemany` per
statement kind.

- **One owner.** Only the event loop's thread touches the buffer; the backend's driver
  sees finished batches only.
- **Folding.** Two writes of one row that wait in the same batch become one: an
  attempt that ended before its insert went out is inserted complete; a gate row
  released before its insert is inserted released; plan, step and final status of a
  dispatch are merged into one update.
- **Nothing is dropped.** A batch that fails because the database is busy, full,
  read-only or unreachable is tried again, with backoff, until it lands. The outage is
  logged once when it starts (`database_unavailable`) and once when it ends
  (`database_available`, with its duration).
- **A refused write does not sink its neighbours.** When the database refuses a write
  (a constraint), the batch is written again one write at a time: the others land, the
  refused one is reported (`store_write_refused`) to the store's `on_refused` hook and
  to whoever awaits it (`landed`).
- **A fence is not retried.** A batch refused because this daemon's lease was taken
  (`LeaseLost`) is about work another daemon now owns: it is dropped
  (`store_writes_fenced`) and the store's `on_lease_lost` hook is told.
- **A damaged database is not retried.** `DatabaseCorrupt` stops the buffer: waiters
  get the error, and the store's `on_fatal` hook is told.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dispatcher import logs
from dispatcher.errors import (
    DatabaseCorrupt,
    DispatcherError,
    LeaseLost,
    StoreBusy,
    StoreError,
    StoreUnwritable,
)

log = logs.get_logger("dispatcher.store")

Params = dict[str, Any]
WriteBatch = list[tuple[str, list[Params]]]
"""`(statement name, rows)` in the order they must run, one `executemany` each."""

ORDER = ("insert_attempt", "finish_attempt", "insert_slot", "release_slot", "write_progress")
"""Statement kinds in the order a batch runs them: a row's insert before its update."""

FIELDS = {
    "insert_attempt": (
        "id", "dispatch_id", "step_index", "step", "runner", "attempt", "status",
        "started_at", "ended_at", "exit_code", "error", "output", "instance_id", "result",
        "series",
    ),
    "finish_attempt": ("id", "status", "ended_at", "exit_code", "error", "output", "result"),
    "insert_slot": ("id", "gate", "holder", "instance_id", "now", "released_at"),
    "release_slot": ("id", "now"),
    "write_progress": (
        "id", "instance_id", "plan", "current_step", "status", "final", "error", "now",
    ),
}  # fmt: skip
"""The fields of each kind of queued write, in the order a backend sends them as one
row (a PostgreSQL composite type, a SQLite `VALUES` row)."""

RETRY_FIRST = 0.05
RETRY_MAX = 5.0
"""Backoff between tries of a batch while the database cannot take it."""

Fold = Literal["replace", "first", "merge"]


@dataclass(eq=False)
class _Batch:
    rows: dict[str, dict[Any, Params]] = field(default_factory=dict)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    """`flush` callers: woken once the batch has landed."""
    readers: list[asyncio.Future[None]] = field(default_factory=list)
    """`settle` callers: woken once it landed, or once it cannot land for now."""
    fenced: LeaseLost | None = None
    """Set when the batch was refused by the lease fence: `flush` raises it."""
    watchers: dict[tuple[str, Any], list[asyncio.Future[None]]] = field(default_factory=dict)
    """`landed` callers, by write: woken once that write landed, or with its refusal."""

    def __bool__(self) -> bool:
        return any(self.rows.values())

    def size(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def ordered(self) -> WriteBatch:
        return [(name, list(self.rows[name].values())) for name in ORDER if self.rows.get(name)]


class WriteBuffer:
    """The queued writes of one store; see the module docstring."""

    def __init__(
        self,
        write_batch: Callable[[WriteBatch], Awaitable[None]],
        database: str,
        *,
        on_refused: Callable[[str, Mapping[str, Any], StoreError], None] | None = None,
        on_fatal: Callable[[DatabaseCorrupt], None] | None = None,
        on_available: Callable[[], None] | None = None,
        on_lease_lost: Callable[[LeaseLost], None] | None = None,
    ) -> None:
        self._write_batch = write_batch
        self._database = database
        self.on_refused = on_refused
        self.on_fatal = on_fatal
        self.on_available = on_available
        self.on_lease_lost = on_lease_lost
        self._pending = _Batch()
        self._in_flight: _Batch | None = None
        self._task: asyncio.Task[None] | None = None
        self.fatal: DatabaseCorrupt | None = None
        self.outage_since: float | None = None
        """`time.monotonic()` when the current outage began; None while writes land."""

    # -- queueing (loop thread only) --------------------------------------------------------

    def put(self, name: str, key: Any, params: Params, fold: Fold = "replace") -> None:
        """Queue one write of the row `key` with statement `name`.

        `fold`: what a second write of the same row in the same batch does: `replace`
        the first, keep the `first`, or `merge` its fields into it.
        """
        if self.fatal is not None:
            return  # the daemon is stopping on a damaged database: nothing can land
        rows = self._pending.rows.setdefault(name, {})
        queued = rows.get(key)
        if queued is None or fold == "replace":
            rows[key] = params
        elif fold == "merge":
            queued.update(params)
        self._schedule()

    def queued_write(self, name: str, key: Any) -> Params | None:
        """The `name` write of row `key` while it waits and can still be changed in
        place; None once its batch has gone out (or when there is none)."""
        rows = self._pending.rows.get(name)
        return None if rows is None else rows.get(key)

    def queued_keys(self, name: str) -> list[Any]:
        """Rows with a `name` write waiting or being written (not landed yet)."""
        keys = list(self._pending.rows.get(name, ()))
        if self._in_flight is not None:
            keys += self._in_flight.rows.get(name, ())
        return keys

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being written."""
        return not self._pending and self._in_flight is None

    def queued(self) -> int:
        """Writes waiting or being written."""
        flying = self._in_flight.size() if self._in_flight is not None else 0
        return self._pending.size() + flying

    async def flush(self) -> None:
        """Return once every write queued before the call has landed (or was refused),
        however long the database is away."""
        await self._wait(strict=True)

    async def landed(self, name: str, key: Any) -> None:
        """Return once the queued `name` write of row `key` has landed, however long the
        database is away; raise what refused it: the database's `StoreError` (a
        constraint), `LeaseLost` (the fence), `DatabaseCorrupt`. Returns at once when no
        such write waits (it landed already)."""
        if self.fatal is not None:
            raise self.fatal
        for batch in (self._pending, self._in_flight):
            if batch is not None and key in batch.rows.get(name, {}):
                waiter = asyncio.get_running_loop().create_future()
                batch.watchers.setdefault((name, key), []).append(waiter)
                self._schedule()
                await asyncio.shield(waiter)
                return

    async def settle(self) -> None:
        """`flush`, except that it returns at once while the database cannot take
        writes: a read then runs without them (they are not durable yet anyway)
        instead of waiting for the outage to end."""
        if self.outage_since is None:
            await self._wait(strict=False)

    async def _wait(self, strict: bool) -> None:
        if self.fatal is not None:
            raise self.fatal
        if self.idle:
            return
        batch = self._pending if self._pending else self._in_flight
        assert batch is not None
        waiter = asyncio.get_running_loop().create_future()
        (batch.waiters if strict else batch.readers).append(waiter)
        self._schedule()
        await asyncio.shield(waiter)

    async def close(self, patience: float) -> int:
        """Write what is queued, trying for up to `patience` seconds; answer how many
        writes could not land (0 normally)."""
        if self._task is None or self._task.done():
            return 0
        try:
            await asyncio.wait_for(asyncio.shield(self._task), patience)
        except TimeoutError:
            lost = self.queued()
            self._task.cancel()
            log.error(
                "store_writes_lost",
                database=self._database,
                writes=lost,
                repair="recovery at the next start puts their dispatches back in the queue",
            )
            return lost
        return 0

    # -- writing -------------------------------------------------------------------------

    def _schedule(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Write batch after batch until nothing is queued (one task at a time)."""
        while self._pending and self.fatal is None:
            batch, self._pending = self._pending, _Batch()
            self._in_flight = batch
            try:
                await self._land(batch)
            except DatabaseCorrupt as exc:
                self._fail(batch, exc)
            except LeaseLost as exc:
                self._fenced(batch, exc)
            except Exception as exc:  # a defect: say so loudly, don't hang the waiters
                log.exception("store_write_failed", database=self._database, error=str(exc))
            finally:
                self._in_flight = None
            for watchers in batch.watchers.values():
                _wake(watchers, batch.fenced)
            _wake(batch.waiters, batch.fenced)
            _wake(batch.readers)
        if self.fatal is not None and self._pending:
            self._fail(self._pending, self.fatal)

    async def _land(self, batch: _Batch) -> None:
        """Write `batch`, again and again while the database cannot take it."""
        delay = RETRY_FIRST
        while batch:
            try:
                await self._write_or_split(batch)
            except (StoreBusy, StoreUnwritable) as exc:
                self._outage(exc)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, RETRY_MAX)
                continue
            self._recovered()
            return

    async def _write_or_split(self, batch: _Batch) -> None:
        try:
            await self._write_batch(batch.ordered())
        except (StoreBusy, StoreUnwritable, DatabaseCorrupt, LeaseLost):
            raise
        except StoreError:
            await self._one_by_one(batch)
            return
        batch.rows.clear()

    async def _one_by_one(self, batch: _Batch) -> None:
        """A write was refused: each alone, so that only the refused one stays out.

        What lands or is refused leaves the batch at once, so a retry after an outage
        in the middle writes only the rest.
        """
        for name in ORDER:
            rows = batch.rows.get(name, {})
            for key, row in list(rows.items()):
                try:
                    await self._write_batch([(name, [row])])
                except (StoreBusy, StoreUnwritable, DatabaseCorrupt, LeaseLost):
                    raise
                except StoreError as exc:
                    log.error("store_write_refused", statement=name, error=str(exc))
                    _wake(batch.watchers.pop((name, key), []), exc)
                    if self.on_refused is not None:
                        self.on_refused(name, row, exc)
                del rows[key]
        batch.rows.clear()

    def _outage(self, exc: DispatcherError) -> None:
        for batch in (self._in_flight, self._pending):
            if batch is not None:
                _wake(batch.readers)
                batch.readers.clear()
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.error(
                "database_unavailable",
                database=self._database,
                error=str(exc),
                queued_writes=self.queued(),
                action="writes are kept and tried again until they land",
            )

    def _recovered(self) -> None:
        if self.outage_since is None:
            return
        duration = time.monotonic() - self.outage_since
        self.outage_since = None
        log.warning(
            "database_available", database=self._database, duration_ms=round(duration * 1000)
        )
        if self.on_available is not None:
            self.on_available()

    def _fenced(self, batch: _Batch, exc: LeaseLost) -> None:
        """The lease was taken: these writes are about work another daemon now owns.
        They are dropped, not retried (the other daemon redoes the work)."""
        log.error(
            "store_writes_fenced", database=self._database, writes=batch.size(), error=str(exc)
        )
        batch.rows.clear()
        batch.fenced = exc  # a flush waiting for these must not go on as if they landed
        if self.on_lease_lost is not None:
            self.on_lease_lost(exc)

    def _fail(self, batch: _Batch, exc: DatabaseCorrupt) -> None:
        first = self.fatal is None
        self.fatal = exc
        watchers = [w for ws in batch.watchers.values() for w in ws]
        for waiter in [*batch.waiters, *batch.readers, *watchers]:
            if not waiter.done():
                waiter.set_exception(exc)
        batch.waiters.clear()
        batch.readers.clear()
        batch.watchers.clear()
        if first and self.on_fatal is not None:
            self.on_fatal(exc)


def _wake(waiters: list[asyncio.Future[None]], error: BaseException | None = None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)
