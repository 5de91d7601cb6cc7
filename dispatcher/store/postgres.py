"""The PostgreSQL store: the `Store` protocol on an asyncpg pool, shared by several daemons.

Same tables and semantics as the SQLite store, with what one database for many hosts
needs: claims with `FOR UPDATE SKIP LOCKED`, gate slots granted under a per-gate
advisory lock (`try_take_slot`), leases (`reap_dead_instances`: rows of an instance
whose heartbeat is older than the TTL are released by any live one), `LISTEN/NOTIFY`
wake-ups (`subscribe`) and a maintenance advisory lock. Gate mirror rows are queued and
written in order by one background task. Driver errors become `StoreBusy` /
`StoreError` / `KeyConflict` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from dispatcher import logs
from dispatcher.errors import DispatcherError, KeyConflict, NotFound, StoreBusy, StoreError
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
from dispatcher.store.sql import queries

log = logs.get_logger("dispatcher.store.postgres")

CANCELLED_BEFORE_START = "cancelled before it started"
CHANNELS = ("dispatcher_dispatches", "dispatcher_gates")
"""NOTIFY channels: a dispatch was inserted or asked to cancel; a gate row was released."""

RELISTEN_FIRST = 0.5
RELISTEN_MAX = 30.0
"""Backoff between tries to listen again after the listening connection was lost
(the first try is at once)."""

Params = Mapping[str, Any]
Connection = Any  # asyncpg.Connection or a pool proxy of one; asyncpg ships no stubs
_MirrorOp = Callable[[Connection], Awaitable[None]]

# -- statements --------------------------------------------------------------------------

_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class Statement:
    """A named statement with its `:name` parameters turned into `$n` positions."""

    sql: str
    names: tuple[str, ...]

    def args(self, params: Params) -> list[Any]:
        """The positional arguments for `params` (a missing one is a `KeyError`)."""
        return [params[name] for name in self.names]


def compile_statement(sql: str) -> Statement:
    """Comments dropped, each distinct `:name` numbered in order of first use."""
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return Statement(_PARAM.sub(number, body), tuple(names))


@functools.cache
def statement(name: str) -> Statement:
    """The compiled statement `name` of `postgres.sql`."""
    return compile_statement(queries("postgres.sql")[name])


# -- driver errors -----------------------------------------------------------------------

_BUSY = (
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.LockNotAvailableError,
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
    asyncpg.QueryCanceledError,
)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@contextmanager
def wrap_exceptions(url: str, doing: str = "use") -> Iterator[None]:
    """Turn driver and connection errors into `StoreBusy` or `StoreError`."""
    where = redact(url)
    try:
        yield
    except _BUSY as exc:
        raise StoreBusy(f"database {where} is busy: {exc}; try again") from exc
    except asyncpg.PostgresError as exc:
        raise StoreError(f"cannot {doing} database {where}: {exc}") from exc
    except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise StoreBusy(f"cannot reach database {where}: {reason}; try again") from exc


# -- migrations --------------------------------------------------------------------------

_MIGRATION_NAME = re.compile(r"^(?P<version>\d+)_\w+\.sql$")


def load_migrations() -> list[tuple[int, str]]:
    """Every `(version, sql)` of `pg_migrations/`, in version order."""
    folder = resources.files("dispatcher.store").joinpath("pg_migrations")
    found: dict[int, str] = {}
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is not None:
            version = int(match["version"])
            if version in found:
                raise StoreError(f"two PostgreSQL migrations share version {version}")
            found[version] = entry.read_text(encoding="utf-8")
    return sorted(found.items())


# -- rows to records ---------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _aware(value: datetime) -> datetime:
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: the store takes timezone-aware times")
    return value


def _plan(text: str | None) -> tuple[Step, ...] | None:
    return None if text is None else tuple(Step.from_json(s) for s in json.loads(text))


def dispatch_from_record(row: Any) -> Dispatch:
    """A `dispatches` row as a record."""
    return Dispatch(
        id=row["id"],
        task=row["task"],
        params=json.loads(row["params"]),
        key=row["key"],
        fingerprint=row["fingerprint"],
        priority=row["priority"],
        status=DispatchStatus(row["status"]),
        plan=_plan(row["plan"]),
        current_step=row["current_step"],
        gate_key=row["gate_key"],
        not_before=_utc(row["not_before"]),
        cancel_requested=row["cancel_requested"],
        error=row["error"],
        instance_id=row["instance_id"],
        created_at=row["created_at"].astimezone(UTC),
        updated_at=row["updated_at"].astimezone(UTC),
        started_at=_utc(row["started_at"]),
        finished_at=_utc(row["finished_at"]),
        claims=row["claims"],
    )


def attempt_from_record(row: Any) -> Attempt:
    """An `attempts` row as a record."""
    return Attempt(
        id=row["id"],
        dispatch_id=row["dispatch_id"],
        step_index=row["step_index"],
        step=row["step"],
        runner=row["runner"],
        attempt=row["attempt"],
        status=AttemptStatus(row["status"]),
        started_at=row["started_at"].astimezone(UTC),
        ended_at=_utc(row["ended_at"]),
        exit_code=row["exit_code"],
        error=row["error"],
        output=row["output"],
        instance_id=row["instance_id"],
    )


def slot_from_record(row: Any) -> SlotRow:
    """A `gates` row as a record."""
    return SlotRow(
        id=row["id"],
        gate=row["gate"],
        holder=row["holder"],
        instance_id=row["instance_id"],
        acquired_at=row["acquired_at"].astimezone(UTC),
        released_at=_utc(row["released_at"]),
        recovered=row["recovered"],
    )


def instance_from_record(row: Any) -> Instance:
    """An `instances` row as a record."""
    return Instance(
        id=row["id"],
        hostname=row["hostname"],
        pid=row["pid"],
        version=row["version"],
        started_at=row["started_at"].astimezone(UTC),
        heartbeat_at=row["heartbeat_at"].astimezone(UTC),
        stopped_at=_utc(row["stopped_at"]),
    )


def _new_dispatch_params(new: NewDispatch, now: datetime) -> dict[str, Any]:
    return {
        "task": new.task,
        "params": json.dumps(new.params, separators=(",", ":")),
        "key": new.key,
        "fingerprint": new.fingerprint,
        "priority": new.priority,
        "gate_key": new.gate_key,
        "now": _aware(now),
    }


async def _fetch(con: Connection, name: str, params: Params | None = None) -> list[Any]:
    stmt = statement(name)
    rows: list[Any] = await con.fetch(stmt.sql, *stmt.args(params or {}))
    return rows


async def _reserve(con: Connection, new: NewDispatch, now: datetime) -> Reservation:
    """Insert unless the key is taken; a taken key must carry the same fingerprint."""
    rows = await _fetch(con, "insert_dispatch", _new_dispatch_params(new, now))
    if rows:
        return Reservation(rows[0]["id"], DispatchStatus(rows[0]["status"]), created=True)
    assert new.key is not None, "only a keyed insert can conflict"
    existing = (await _fetch(con, "dispatch_by_key", {"key": new.key}))[0]
    if existing["fingerprint"] != new.fingerprint:
        raise KeyConflict(new.key, existing["id"])
    return Reservation(existing["id"], DispatchStatus(existing["status"]), created=False)


# -- the store ---------------------------------------------------------------------------


class PostgresStore:
    """The `Store` on PostgreSQL. Create it with `await PostgresStore.open(url)`.

    `shared` is True: several daemons use one database, so the gate asks the database
    (`try_take_slot`) before granting a place, and recovery leaves live instances alone.
    """

    shared = True

    def __init__(self, pool: Any, url: str, instance_ttl: float) -> None:
        self._pool = pool
        self._url = url
        self._ttl = timedelta(seconds=instance_ttl)
        self._mirror: asyncio.Queue[_MirrorOp | None] = asyncio.Queue()
        self._drainer: asyncio.Task[None] | None = None
        self._listener: Any = None
        self._on_change: Callable[[], None] | None = None
        self._relisten: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls, url: str, *, instance_ttl: float = 30.0, min_size: int = 1, max_size: int = 10
    ) -> PostgresStore:
        """Connect a pool and migrate forward (one starter at a time: advisory lock).

        `instance_ttl` bounds how long a silent instance is considered alive: recovery
        at start only touches rows of instances older than that.
        """
        with wrap_exceptions(url, "open"):
            pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size)
        store = cls(pool, url, instance_ttl)
        try:
            await store._migrate()
        except BaseException:
            await store.close()
            raise
        store._drainer = asyncio.create_task(store._drain_mirror())
        return store

    @property
    def url(self) -> str:
        """The database URL, password redacted."""
        return redact(self._url)

    async def close(self) -> None:
        """Write the queued mirror rows, stop listening, close the pool; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._drainer is not None:
            self._mirror.put_nowait(None)
            with contextlib.suppress(Exception):
                await self._drainer
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(BaseException):
                await self._relisten
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        await self._pool.close()

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _wrap(self, doing: str = "use") -> Iterator[None]:
        if self._closed:
            raise StoreError(f"database {self.url}: the store is closed")
        with wrap_exceptions(self._url, doing):
            yield

    async def _run(self, name: str, params: Params | None = None) -> list[Any]:
        """One named statement on a pooled connection: atomic by itself."""
        with self._wrap():
            async with self._pool.acquire() as con:
                return await _fetch(con, name, params)

    @asynccontextmanager
    async def _transaction(self, doing: str = "use") -> AsyncIterator[Connection]:
        with self._wrap(doing):
            async with self._pool.acquire() as con, con.transaction():
                yield con

    async def _migrate(self) -> None:
        migrations = load_migrations()
        known = migrations[-1][0] if migrations else 0
        async with self._transaction("migrate") as con:
            await _fetch(con, "migrations_lock")
            await _fetch(con, "migrations_create_table")
            current: int = (await _fetch(con, "migrations_current"))[0]["version"]
            if current > known:
                raise StoreError(
                    f"database schema version {current} is newer than this dispatcher "
                    f"supports ({known})"
                )
            for version, sql in migrations:
                if version > current:
                    await con.execute(sql)
                    now = datetime.now(UTC)
                    await _fetch(con, "migrations_record", {"version": version, "now": now})

    async def _drain_mirror(self) -> None:
        """Write queued gate rows in order, each batch in one transaction."""
        while True:
            op = await self._mirror.get()
            batch = [op]
            while not self._mirror.empty():
                batch.append(self._mirror.get_nowait())
            try:
                await self._write_batch([item for item in batch if item is not None])
            except Exception as exc:  # the rows are a mirror: log, keep going
                log.error("store_write_failed", database=self.url, error=str(exc))
            finally:
                for _ in batch:
                    self._mirror.task_done()
            if None in batch:
                return

    async def _write_batch(self, batch: list[_MirrorOp]) -> None:
        if not batch:
            return
        with wrap_exceptions(self._url):
            async with self._pool.acquire() as con, con.transaction():
                for op in batch:
                    await op(con)

    async def _flush_mirror(self) -> None:
        """Wait until every queued gate row is written (read-your-writes on gates)."""
        if self._drainer is not None and not self._drainer.done():
            await self._mirror.join()

    # -- submission -------------------------------------------------------------------

    async def check_and_reserve(self, new: NewDispatch, now: datetime) -> Reservation:
        """Create a `queued` dispatch, or answer the one already holding `new.key`."""
        async with self._transaction() as con:
            return await _reserve(con, new, now)

    async def reserve_many(
        self, news: Sequence[NewDispatch], now: datetime
    ) -> list[Reservation | Exception]:
        """Reserve each in one transaction; a `KeyConflict` is answered in its place."""
        answers: list[Reservation | Exception] = []
        if not news:
            return answers
        async with self._transaction() as con:
            for new in news:
                try:
                    answers.append(await _reserve(con, new, now))
                except KeyConflict as exc:
                    answers.append(exc)
        return answers

    # -- the dispatch loop ------------------------------------------------------------

    async def claim_next(
        self, instance_id: str, now: datetime, blocked_gates: Collection[str]
    ) -> Dispatch | None:
        """Take the next runnable `queued` dispatch (priority, then age)."""
        claimed = await self.claim_many(instance_id, now, blocked_gates, 1)
        return claimed[0] if claimed else None

    async def claim_many(
        self, instance_id: str, now: datetime, blocked_gates: Collection[str], limit: int
    ) -> list[Dispatch]:
        """Up to `limit` runnable dispatches in one statement (SKIP LOCKED), in claim order."""
        params = {
            "instance_id": instance_id,
            "now": _aware(now),
            "blocked_gates": sorted(blocked_gates),
            "limit": limit,
        }
        claimed = [dispatch_from_record(row) for row in await self._run("claim_many", params)]
        claimed.sort(key=lambda d: (-d.priority, d.id))
        return claimed

    async def save_plan(self, dispatch_id: int, plan: Sequence[Step], now: datetime) -> None:
        """Store the plan; the dispatch becomes `running` at step 0."""
        plan_json = json.dumps([step.to_json() for step in plan], separators=(",", ":"))
        await self._run("save_plan", {"id": dispatch_id, "plan": plan_json, "now": _aware(now)})

    async def advance(self, dispatch_id: int, next_step: int, now: datetime) -> None:
        """Record that every step before `next_step` has succeeded."""
        params = {"id": dispatch_id, "next_step": next_step, "now": _aware(now)}
        await self._run("advance", params)

    async def requeue(
        self, dispatch_id: int, now: datetime, not_before: datetime | None = None
    ) -> None:
        """Return an in-flight dispatch to `queued` (plan and current step kept)."""
        params = {"id": dispatch_id, "now": _aware(now), "not_before": not_before}
        await self._run("requeue", params)

    async def finish_dispatch(
        self, dispatch_id: int, status: DispatchStatus, now: datetime, error: str | None = None
    ) -> None:
        """Stamp a final status; a dispatch already final is left alone."""
        if not status.is_final:
            raise ValueError(f"finish_dispatch needs a final status, not {status}")
        params = {"id": dispatch_id, "status": str(status), "now": _aware(now), "error": error}
        await self._run("finish_dispatch", params)

    async def request_cancel(self, dispatch_id: int, now: datetime) -> Dispatch:
        """Cancel a `queued` dispatch at once; flag an in-flight one; raise `NotFound`."""
        params = {"id": dispatch_id, "now": _aware(now), "error": CANCELLED_BEFORE_START}
        async with self._transaction() as con:
            rows = await _fetch(con, "request_cancel", params)
            if not rows:
                rows = await _fetch(con, "get_dispatch", {"id": dispatch_id})
        if not rows:
            raise NotFound(f"no dispatch with id {dispatch_id}")
        return dispatch_from_record(rows[0])

    async def cancel_requests(self, dispatch_ids: Collection[int]) -> list[int]:
        """Which of these dispatches have a pending cancel request (ascending ids)."""
        if not dispatch_ids:
            return []
        rows = await self._run("cancel_requests", {"ids": list(dispatch_ids)})
        return [row["id"] for row in rows]

    # -- attempts ---------------------------------------------------------------------

    async def flush(self) -> None:
        """Every write of this store is awaited until it has committed: nothing to do."""

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
        params = {
            "dispatch_id": dispatch_id,
            "step_index": step_index,
            "step": step,
            "runner": runner,
            "attempt": attempt,
            "instance_id": instance_id,
            "now": _aware(now),
        }
        rows = await self._run("start_attempt", params)
        attempt_id: int = rows[0]["id"]
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
        params = {
            "id": attempt_id,
            "status": str(status),
            "now": _aware(now),
            "exit_code": exit_code,
            "error": error,
            "output": output,
        }
        await self._run("finish_attempt", params)

    async def step_attempts(self, dispatch_id: int, step_index: int) -> list[Attempt]:
        """Every attempt of one step, oldest first."""
        params = {"dispatch_id": dispatch_id, "step_index": step_index}
        return [attempt_from_record(row) for row in await self._run("step_attempts", params)]

    # -- reading ----------------------------------------------------------------------

    async def get_dispatch(self, dispatch_id: int) -> Dispatch | None:
        """One dispatch, or None."""
        rows = await self._run("get_dispatch", {"id": dispatch_id})
        return dispatch_from_record(rows[0]) if rows else None

    async def list_dispatches(
        self, status: DispatchStatus | None = None, limit: int = 50
    ) -> list[Dispatch]:
        """Newest first."""
        limit = max(limit, 0)
        if status is None:
            rows = await self._run("list_dispatches", {"limit": limit})
        else:
            params = {"status": str(status), "limit": limit}
            rows = await self._run("list_dispatches_by_status", params)
        return [dispatch_from_record(row) for row in rows]

    async def list_attempts(self, dispatch_id: int) -> list[Attempt]:
        """Oldest first."""
        rows = await self._run("list_attempts", {"dispatch_id": dispatch_id})
        return [attempt_from_record(row) for row in rows]

    async def count_by_status(self) -> dict[DispatchStatus, int]:
        """Dispatches per status; every status is present (0 when none)."""
        counts = dict.fromkeys(DispatchStatus, 0)
        for row in await self._run("count_by_status"):
            counts[DispatchStatus(row["status"])] = row["n"]
        return counts

    # -- gate mirror ------------------------------------------------------------------

    async def open_slot(self, gate: str, holder: str, instance_id: str, now: datetime) -> int:
        """Insert a held `gates` row and return its id."""
        params = {"gate": gate, "holder": holder, "instance_id": instance_id, "now": _aware(now)}
        slot_id: int = (await self._run("open_slot", params))[0]["id"]
        return slot_id

    async def close_slot(self, slot_id: int, now: datetime) -> bool:
        """Stamp `released_at` on a held row; False when it was already released."""
        await self._flush_mirror()
        rows = await self._run("close_slot", {"id": slot_id, "now": _aware(now)})
        return len(rows) == 1

    def mirror_open(self, gate: str, holder: str, instance_id: str, now: datetime) -> SlotHandle:
        """Queue the insert of a held row; the handle learns its id when it is written."""
        handle = SlotHandle(gate, holder)
        params = {"gate": gate, "holder": holder, "instance_id": instance_id, "now": _aware(now)}

        async def insert(con: Connection) -> None:
            handle.row_id = (await _fetch(con, "open_slot", params))[0]["id"]

        self._post(insert)
        return handle

    def mirror_close(self, handle: SlotHandle, now: datetime) -> None:
        """Queue the release of the row (after its insert: the queue keeps order)."""
        released_at = _aware(now)

        async def release(con: Connection) -> None:
            if handle.row_id is not None:
                await _fetch(con, "mirror_close", {"id": handle.row_id, "now": released_at})

        self._post(release)

    def _post(self, op: _MirrorOp) -> None:
        if self._closed:
            raise StoreError(f"database {self.url}: the store is closed")
        self._mirror.put_nowait(op)

    async def held_slots(self) -> list[SlotRow]:
        """Every row with `released_at` NULL, oldest first."""
        await self._flush_mirror()
        return [slot_from_record(row) for row in await self._run("held_slots")]

    async def gate_row_counts(self) -> GateRowCounts:
        """How many `gates` rows are held and how many released."""
        await self._flush_mirror()
        row = (await self._run("gate_row_counts"))[0]
        return GateRowCounts(held=row["held"], released=row["released"])

    # -- purge and retention ----------------------------------------------------------

    async def purge_released(self, before: datetime, batch_size: int) -> int:
        """Delete one batch of gate rows released before `before`, oldest first."""
        params = {"before": _aware(before), "batch_size": batch_size}
        return len(await self._run("purge_released", params))

    async def count_purgeable(self, before: datetime) -> int:
        """How many gate rows were released before `before`."""
        count: int = (await self._run("count_purgeable", {"before": _aware(before)}))[0]["n"]
        return count

    async def purge_finished_dispatches(
        self, before: datetime, batch_size: int
    ) -> ExpiredDispatches:
        """Delete one batch of final dispatches finished before `before`, with attempts."""
        params = {"before": _aware(before), "batch_size": batch_size}
        async with self._transaction() as con:
            attempts = len(await _fetch(con, "retention_attempts", params))
            dispatches = len(await _fetch(con, "retention_dispatches", params))
        return ExpiredDispatches(dispatches=dispatches, attempts=attempts)

    async def count_expired_dispatches(self, before: datetime) -> ExpiredDispatches:
        """How many final dispatches finished before `before`, and their attempts."""
        row = (await self._run("count_expired", {"before": _aware(before)}))[0]
        return ExpiredDispatches(dispatches=row["dispatches"], attempts=row["attempts"])

    async def reclaim_space(self) -> int:
        """Nothing to do here: PostgreSQL's autovacuum reuses the space of deleted rows."""
        return 0

    async def optimize(self) -> None:
        """`ANALYZE` the three tables, so the planner sees their new sizes."""
        await self._run("optimize")

    async def try_take_slot(
        self, gate: str, holder: str, instance_id: str, capacity: int, now: datetime
    ) -> int | None:
        """Insert a held row only while fewer than `capacity` are held, across all daemons.

        Counted and inserted under a per-gate advisory lock, so concurrent takers
        cannot oversubscribe. Answers the row id, or None when the gate is full.
        """
        params = {"gate": gate, "holder": holder, "instance_id": instance_id, "now": _aware(now)}
        async with self._transaction() as con:
            await _fetch(con, "gate_lock", {"gate": gate})
            held: int = (await _fetch(con, "gate_held_count", {"gate": gate}))[0]["n"]
            if held >= capacity:
                return None
            slot_id: int = (await _fetch(con, "open_slot", params))[0]["id"]
            return slot_id

    # -- lifecycle --------------------------------------------------------------------

    async def recover(self, instance_id: str, now: datetime) -> RecoveryReport:
        """Undo what dead instances left: never rows of an instance heartbeating within
        the TTL (other daemons share this database)."""
        return await self._reap(instance_id, now, self._ttl)

    async def reap_dead_instances(
        self, instance_id: str, now: datetime, ttl: float
    ) -> RecoveryReport:
        """Release slots, interrupt attempts and requeue dispatches of instances (other
        than `instance_id`) whose heartbeat is older than `ttl` seconds."""
        return await self._reap(instance_id, now, timedelta(seconds=ttl))

    async def _reap(self, keep: str, now: datetime, ttl: timedelta) -> RecoveryReport:
        await self._flush_mirror()
        params = {"keep": keep, "now": _aware(now), "since": now - ttl}
        async with self._transaction() as con:
            slots = await _fetch(con, "reap_slots", params)
            attempts = await _fetch(con, "reap_attempts", params)
            dispatches = await _fetch(con, "reap_dispatches", params)
            await _fetch(con, "reap_instances", params)
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
                "started_at": _aware(instance.started_at),
                "heartbeat_at": _aware(instance.heartbeat_at),
                "stopped_at": instance.stopped_at,
            },
        )

    async def heartbeat(self, instance_id: str, now: datetime) -> None:
        """Stamp `heartbeat_at`."""
        await self._run("heartbeat", {"id": instance_id, "now": _aware(now)})

    async def stop_instance(self, instance_id: str, now: datetime) -> None:
        """Stamp `stopped_at` (once)."""
        await self._run("stop_instance", {"id": instance_id, "now": _aware(now)})

    async def live_instances(self, since: datetime) -> list[Instance]:
        """Instances not stopped whose heartbeat is at or after `since`."""
        rows = await self._run("live_instances", {"since": _aware(since)})
        return [instance_from_record(row) for row in rows]

    # -- several daemons --------------------------------------------------------------

    @asynccontextmanager
    async def maintenance_lock(self, name: str) -> AsyncIterator[bool]:
        """Yield True on the one instance that holds the advisory lock `name` (e.g.
        "purge"); False elsewhere: the job is then left to the holder."""
        async with contextlib.AsyncExitStack() as stack:
            with self._wrap():
                con = await stack.enter_async_context(self._pool.acquire())
                rows = await _fetch(con, "maintenance_try_lock", {"name": name})
            locked = bool(rows[0]["locked"])
            try:
                yield locked
            finally:
                if locked:
                    with contextlib.suppress(Exception):
                        await _fetch(con, "maintenance_unlock", {"name": name})

    async def subscribe(self, on_change: Callable[[], None]) -> None:
        """Call `on_change` whenever a dispatch is inserted or asked to cancel, or a gate
        row released, by any process (`LISTEN` on a dedicated connection). Polling stays
        the fallback: a lost listening connection only delays wake-ups until it is back
        (it is opened again with a backoff; `on_change` is then called for what was
        missed)."""
        self._on_change = on_change
        await self._listen()

    async def _listen(self) -> None:
        on_change = self._on_change
        assert on_change is not None
        with self._wrap("listen on"):
            listener = await asyncpg.connect(self._url)
            try:
                for channel in CHANNELS:
                    await listener.add_listener(channel, lambda *_: on_change())
            except BaseException:
                listener.terminate()
                raise
        listener.add_termination_listener(self._listener_lost)
        self._listener = listener

    def _listener_lost(self, _connection: Any) -> None:
        """The listening connection closed: reconnect, unless we closed it."""
        if self._closed or self._relisten is not None:
            return
        log.warning("listen_lost", database=self.url, fallback="polling")
        self._relisten = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        delay = 0.0
        try:
            while not self._closed:
                await asyncio.sleep(delay)
                delay = min(max(delay * 2, RELISTEN_FIRST), RELISTEN_MAX)
                try:
                    await self._listen()
                except DispatcherError:
                    continue
                log.info("listen_restored", database=self.url)
                if self._on_change is not None:
                    self._on_change()  # what was notified while nobody listened
                return
        finally:
            self._relisten = None
