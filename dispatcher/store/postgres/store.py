"""The PostgreSQL store: the `Store` base on an asyncpg pool, shared by several daemons.

Same tables and semantics as the SQLite store, with what one database for many hosts
needs: claims with `FOR UPDATE SKIP LOCKED`, gate slots granted under a per-gate
advisory lock (`try_take_slot`), leases (`reap_dead_instances`: rows of an instance
whose heartbeat is older than the TTL are released by any live one), `LISTEN/NOTIFY`
wake-ups (`subscribe`, in `listen.py`) and a maintenance advisory lock. Row ids are
taken from the sequences in blocks, so queued writes need no round trip each. Driver
errors become the package's own exceptions here (`wrap_exceptions`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
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
from dispatcher.store.base import Migration, Row, Store
from dispatcher.store.postgres.listen import Listener
from dispatcher.store.sql import statements
from dispatcher.store.writes import WriteBatch

Params = Mapping[str, Any]
Connection = Any  # asyncpg.Connection or a pool proxy of one; asyncpg ships no stubs

ID_BLOCK = 64
"""Row ids taken from a sequence at once (gaps after a restart are harmless)."""

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


@contextmanager
def wrap_exceptions(url: str, doing: str = "use") -> Iterator[None]:
    """Turn driver and connection errors into `StoreBusy`, `StoreUnwritable`,
    `DatabaseCorrupt` or `StoreError`."""
    where = redact(url)
    try:
        yield
    except _BUSY as exc:
        raise StoreBusy(f"database {where} is busy: {exc}; try again") from exc
    except _UNWRITABLE as exc:
        raise StoreUnwritable(f"cannot {doing} database {where}: {exc}") from exc
    except _CORRUPT as exc:
        raise DatabaseCorrupt(f"database {where} is damaged: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise StoreError(f"cannot {doing} database {where}: {exc}") from exc
    except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise StoreBusy(f"cannot reach database {where}: {reason}; try again") from exc


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
                url, min_size=min_size, max_size=max_size, server_settings=settings
            )
        store = cls(pool, url, instance_ttl)
        try:
            if not read_only:
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
        await self._pool.close()

    # -- primitives ---------------------------------------------------------------------

    async def _execute(self, name: str, params: Mapping[str, Any], *, first: bool) -> list[Row]:
        with wrap_exceptions(self._url):
            async with self._pool.acquire() as con:
                return await fetch(con, name, params)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Tx]:
        with wrap_exceptions(self._url):
            async with self._pool.acquire() as con, con.transaction():
                yield _Tx(con)

    async def _write_batch(self, writes: WriteBatch, fence: str | None) -> None:
        with wrap_exceptions(self._url, "write"):
            async with self._pool.acquire() as con, con.transaction():
                if fence is not None and not await fetch(
                    con, "lease_check", {"instance_id": fence}
                ):
                    raise LeaseLost(f"instance {fence} was reaped: its writes are refused")
                for name, rows in writes:
                    stmt = statement(name)
                    await con.executemany(stmt.sql, [stmt.args(row) for row in rows])

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
                    with contextlib.suppress(Exception):
                        await fetch(con, "maintenance_unlock", {"name": name})

    async def subscribe(self, on_change: Any) -> None:
        """Call `on_change` whenever a dispatch is inserted or asked to cancel, or a gate
        row released, by any process (`LISTEN` on a dedicated connection, opened again
        when lost; see `listen.py`)."""
        self._listener = Listener(self._url, self.database, on_change)
        with wrap_exceptions(self._url, "listen on"):
            await self._listener.start()


class _Tx:
    """Statements inside one open transaction."""

    def __init__(self, con: Connection) -> None:
        self.con = con

    async def fetch(self, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return await fetch(self.con, name, params)
