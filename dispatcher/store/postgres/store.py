"""The PostgreSQL store: the `Store` base on an asyncpg pool, shared by several daemons.

Same tables and semantics as the SQLite store, with what one database for many hosts
needs: claims with `FOR UPDATE SKIP LOCKED`, leases (`reap_dead_instances`: rows of an
instance whose heartbeat is older than the TTL are released by any live one),
`LISTEN/NOTIFY` wake-ups (`subscribe`, in `listen.py`) and a maintenance advisory lock.

Each hot verb is one statement, one round trip and one short transaction, through the
functions of migration 0022: a batch of queued writes (`dispatcher_write_batch`, on a
connection the writer keeps), a claim with its `global` places (`dispatcher_claim`),
a place of a shared gate (`dispatcher_take_slot`, counted under a per-gate advisory
lock held for that statement only). Pool connections are not reset at release. Row ids
are taken from the sequences in blocks, so queued writes need no round trip each.
Driver errors become the package's own exceptions here (`wrap_exceptions`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from dispatcher.config import redact_url as redact
from dispatcher.errors import (
    DatabaseCorrupt,
    LeaseLost,
    StoreBusy,
    StoreError,
    StoreUnwritable,
)
from dispatcher.store.base import GrantedClaim, Migration, Row, Store, as_sent
from dispatcher.store.postgres.listen import Listener
from dispatcher.store.sql import statements
from dispatcher.store.writes import FIELDS, WriteBatch

Params = Mapping[str, Any]
Connection = Any  # asyncpg.Connection or a pool proxy of one; asyncpg ships no stubs

ID_BLOCK = 256
"""Row ids taken from a sequence at once (gaps after a restart are harmless)."""


async def _keep_session(con: Connection) -> None:
    """The pool's reset hook: nothing. asyncpg's default sends `RESET ALL`, `UNLISTEN *`,
    `pg_advisory_unlock_all()` and `CLOSE ALL` at every release: a round trip per
    statement for state this store never leaves behind (no SET, no LISTEN, no cursor on
    a pool connection; `maintenance_lock` closes its connection when it cannot unlock).
    An open transaction is still rolled back by the pool itself."""
    return None


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
    """The compiled statement `name` (common or PostgreSQL's own)."""
    return compile_statement(statements("dispatcher.store.postgres")[name])


# -- driver errors -----------------------------------------------------------------------

_BUSY = (
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.LockNotAvailableError,
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
    asyncpg.QueryCanceledError,
    asyncpg.AdminShutdownError,
)
_UNWRITABLE = (
    asyncpg.DiskFullError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OutOfMemoryError,
)
_CORRUPT = (asyncpg.DataCorruptedError, asyncpg.IndexCorruptedError)

LEASE_REFUSED = "DPL01"
"""SQLSTATE of a fenced write refused by the functions of migration 0022."""


@contextmanager
def wrap_exceptions(url: str, doing: str = "use") -> Iterator[None]:
    """Turn driver and connection errors into `StoreBusy`, `StoreUnwritable`,
    `DatabaseCorrupt`, `LeaseLost` (a fenced write refused) or `StoreError`."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        raise _wrapped(exc, redact(url), doing) from exc
    except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise StoreBusy(f"cannot reach database {redact(url)}: {reason}; try again") from exc


def _wrapped(exc: Exception, where: str, doing: str) -> Exception:
    if getattr(exc, "sqlstate", None) == LEASE_REFUSED:
        return LeaseLost(str(exc))
    if isinstance(exc, _BUSY):
        return StoreBusy(f"database {where} is busy: {exc}; try again")
    if isinstance(exc, _UNWRITABLE):
        return StoreUnwritable(f"cannot {doing} database {where}: {exc}")
    if isinstance(exc, _CORRUPT):
        return DatabaseCorrupt(f"database {where} is damaged: {exc}")
    return StoreError(f"cannot {doing} database {where}: {exc}")


async def fetch(con: Connection, name: str, params: Params | None = None) -> list[Any]:
    """Run the named statement on `con`; its rows."""
    stmt = statement(name)
    rows: list[Any] = await con.fetch(stmt.sql, *stmt.args(params or {}))
    return rows


# -- the store ---------------------------------------------------------------------------


class PostgresStore(Store):
    """The `Store` on PostgreSQL. Create it with `await PostgresStore.open(url)`.

    `shared` is True: several daemons use one database, so the gate asks the database
    (`try_take_slot`) before granting a place, and recovery leaves live instances alone.
    """

    shared = True
    migrations = "dispatcher.store.postgres"

    def __init__(self, pool: Any, url: str, instance_ttl: float) -> None:
        super().__init__(redact(url))
        self._pool = pool
        self._url = url
        self.instance_ttl = instance_ttl
        self._listener: Listener | None = None
        self._writer: Connection | None = None
        """The connection the queued writes go through, kept (opened at the first
        batch, again after it broke)."""
        self._settings: dict[str, str] = {}

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        instance_ttl: float = 30.0,
        min_size: int = 1,
        max_size: int = 10,
        read_only: bool = False,
    ) -> PostgresStore:
        """Connect a pool and migrate forward (one starter at a time: advisory lock).

        `instance_ttl` bounds how long a silent instance is considered alive: recovery
        at start only touches rows of instances older than that. `read_only`: every
        transaction is read-only and nothing is migrated.
        """
        settings = {"default_transaction_read_only": "on"} if read_only else {}
        with wrap_exceptions(url, "open"):
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                server_settings=settings,
                reset=_keep_session,
            )
        store = cls(pool, url, instance_ttl)
        store._settings = settings
        try:
            if read_only:
                await store._check_schema()
            else:
                await store._migrate()
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def url(self) -> str:
        """The database URL, password redacted."""
        return self.database

    async def _close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer.close()
        await self._pool.close()

    # -- primitives ---------------------------------------------------------------------

    async def _execute(self, name: str, params: Mapping[str, Any], *, first: bool) -> list[Row]:
        with wrap_exceptions(self._url):
            async with self._pool.acquire() as con:
                return await fetch(con, name, as_sent(params))

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Tx]:
        with wrap_exceptions(self._url):
            async with self._pool.acquire() as con, con.transaction():
                yield _Tx(con)

    async def _write_batch(self, writes: WriteBatch, fence: str | None) -> None:
        """One statement: `dispatcher_write_batch` (migration 0022) with every row of
        every kind, fenced in the same transaction; on the writer's own connection."""
        params: dict[str, Any] = {name: [] for name in FIELDS}
        params["fence"] = fence
        for name, rows in writes:
            fields = FIELDS[name]  # the order of the composite types (migration 0022)
            params[name] = [tuple(row[field] for field in fields) for row in rows]
        with wrap_exceptions(self._url, "write"):
            con = await self._writer_connection()
            try:
                await fetch(con, "write_batch", params)
            except asyncpg.PostgresError:
                raise  # refused by the server: the connection itself is fine
            except BaseException:
                self._drop_writer()  # broken, or cancelled half-way through
                raise

    async def _writer_connection(self) -> Connection:
        if self._writer is None or self._writer.is_closed():
            self._writer = await asyncpg.connect(self._url, server_settings=self._settings)
        return self._writer

    def _drop_writer(self) -> None:
        """The writer's connection broke (or a batch was cancelled half-way): close it
        for good; the next batch opens a new one."""
        if self._writer is not None:
            self._writer.terminate()
            self._writer = None

    async def _claim_with_slots(
        self, params: Mapping[str, Any], slot_ids: Sequence[int]
    ) -> GrantedClaim:
        """One statement (`dispatcher_claim`, migration 0022)."""
        rows = await self._fetch("claim_with_slots", params, first=True)
        room = rows[0]["room"] if rows else 0
        claimed = [(self.dispatch_from_row(row), row["slot_id"]) for row in rows if row["id"]]
        return GrantedClaim(claimed, room)

    async def try_take_slot(
        self, gate: str, holder: str, instance_id: str, capacity: int, now: datetime
    ) -> int | None:
        """One statement (`dispatcher_take_slot`, migration 0022), ahead of the queued
        writes: the rows whose release is queued count as free."""
        params = {
            "id": await self._next_id("gates"),
            "gate": gate,
            "holder": holder,
            "instance_id": instance_id,
            "capacity": capacity,
            "now": self._time(now),
            "fence": self.lease,
            "released": self._writes.queued_keys("release_slot"),
        }
        slot_id: int | None = (await self._fetch("take_slot", params, first=True))[0]["id"]
        return slot_id

    async def _id_block(self, table: str) -> Iterator[int]:
        rows = await self._execute("id_block", {"table": table, "size": ID_BLOCK}, first=True)
        return iter([row["id"] for row in rows])

    async def _apply_migration(self, tx: Any, migration: Migration) -> None:
        with wrap_exceptions(self._url, "migrate"):
            await tx.con.execute(migration.sql)

    # -- several daemons --------------------------------------------------------------

    @asynccontextmanager
    async def maintenance_lock(self, name: str) -> AsyncIterator[bool]:
        """Yield True on the one instance that holds the advisory lock `name` (e.g.
        "purge"); False elsewhere: the job is then left to the holder."""
        async with contextlib.AsyncExitStack() as stack:
            with wrap_exceptions(self._url):
                con = await stack.enter_async_context(self._pool.acquire())
                rows = await fetch(con, "maintenance_try_lock", {"name": name})
            locked = bool(rows[0]["locked"])
            try:
                yield locked
            finally:
                if locked:
                    try:
                        await fetch(con, "maintenance_unlock", {"name": name})
                    except Exception:
                        # The pool does not reset its connections: one that may still
                        # hold the session lock is closed instead (the lock goes with it).
                        con.terminate()

    async def subscribe(
        self,
        on_change: Callable[[], None],
        *,
        on_cancel: Callable[[], None] | None = None,
        on_released: Callable[[], None] | None = None,
    ) -> None:
        """Call `on_change` whenever a dispatch is inserted, `on_cancel` when one is
        asked to cancel, `on_released` when gate rows are released, by any process
        (`on_change` for all three when the others are not given; `LISTEN` on a
        dedicated connection, opened again when lost; see `listen.py`)."""
        self._listener = Listener(
            self._url, self.database, on_change, on_cancel=on_cancel, on_released=on_released
        )
        with wrap_exceptions(self._url, "listen on"):
            await self._listener.start()


class _Tx:
    """Statements inside one open transaction."""

    def __init__(self, con: Connection) -> None:
        self.con = con

    async def fetch(self, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return await fetch(self.con, name, params)
