"""What only the SQLite store does: files, WAL, migrations, locks, driver errors."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatcher.errors import EX_TEMPFAIL, SchemaBehind, StoreBusy, StoreError
from dispatcher.models import DispatchStatus, NewDispatch
from dispatcher.store.base import Access, load_migrations
from dispatcher.store.sql import parse_queries, statements
from dispatcher.store.sqlite import SQLiteStore, from_db_time, to_db_time
from dispatcher.store.sqlite.store import split_statements

NOW = datetime(2026, 11, 29, 2, 35, 45, 123456, tzinfo=UTC)

Opener = Callable[..., Awaitable[SQLiteStore]]


def query(name: str) -> str:
    """A named statement of the SQLite store."""
    return statements("dispatcher.store.sqlite")[name]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "dispatcher.db"


@pytest.fixture
async def open_store(db_path: Path) -> AsyncIterator[Opener]:
    """`await open_store(path=db_path, **options)`; every store opened is closed after."""
    opened: list[SQLiteStore] = []

    async def _open(path: Path = db_path, **options: int) -> SQLiteStore:
        store = await SQLiteStore.open(path, **options)
        opened.append(store)
        return store

    try:
        yield _open
    finally:
        for store in opened:
            await store.close()


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection in autocommit mode, closed on exit."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA foreign_keys = ON")
        yield db


# -- opening ---------------------------------------------------------------------------------


async def test_open_creates_folders_and_turns_wal_on(open_store: Opener, db_path: Path) -> None:
    await open_store()

    with raw(db_path) as db:  # WAL is persistent: this reads it from the file's header
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_migrations_apply_once_and_data_survives_reopening(
    open_store: Opener, db_path: Path
) -> None:
    first = await open_store()
    answer = await first.check_and_reserve(NewDispatch(task="t", params={}, key="k"), NOW)
    await first.close()

    second = await open_store()

    known = [m.version for m in load_migrations("dispatcher.store.sqlite")]
    with raw(db_path) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
    assert versions == known == sorted(set(known))
    dispatch = await second.get_dispatch(answer.id)
    assert dispatch is not None and dispatch.key == "k"


async def test_a_newer_schema_is_refused(open_store: Opener, db_path: Path) -> None:
    store = await open_store()
    await store.close()
    known = load_migrations("dispatcher.store.sqlite")[-1].version
    with raw(db_path) as db:
        db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (known + 7, to_db_time(NOW)))

    with pytest.raises(StoreError) as caught:
        await open_store()

    assert str(caught.value) == (
        f"database schema version {known + 7} is newer than this dispatcher supports "
        f"({known}): upgrade dispatcher"
    )


async def test_a_read_on_an_older_schema_is_refused_and_changes_nothing(
    open_store: Opener, db_path: Path
) -> None:
    """A read-only command after an upgrade of the code, before the daemon (or `init`)
    migrated the database, would read rows without the columns it expects."""
    store = await open_store()
    await store.close()
    newest = load_migrations("dispatcher.store.sqlite")[-1].version
    with raw(db_path) as db:
        db.execute("DELETE FROM schema_migrations WHERE version = ?", (newest,))
        behind = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]

    with pytest.raises(SchemaBehind) as caught:
        await SQLiteStore.open(db_path, mode=Access.READ)

    assert str(caught.value) == (
        f"database {db_path} is at schema version {behind}, older than this dispatcher's "
        f"({newest}): the daemon upgrades it when it starts (or run `dispatcher init`); "
        "read commands change nothing"
    )
    assert caught.value.exit_code == EX_TEMPFAIL
    with raw(db_path) as db:
        assert db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] == behind
    with raw(db_path) as db:  # what the daemon's migration records (its DDL is there)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (newest, to_db_time(NOW)))
    reader = await SQLiteStore.open(db_path, mode=Access.READ)
    await reader.close()


async def test_two_stores_opening_a_new_database_at_once(open_store: Opener) -> None:
    stores = await asyncio.gather(*(open_store() for _ in range(4)))

    for store in stores:
        assert await store.count_by_status() == dict.fromkeys(DispatchStatus, 0)
    with raw(stores[0].path) as db:
        applied = db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()
    assert applied == (len(load_migrations("dispatcher.store.sqlite")),)  # each migration once


async def test_a_folder_that_cannot_be_made_is_a_store_error(
    open_store: Opener, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    path = blocker / "dispatcher.db"

    with pytest.raises(StoreError, match=re.escape(f"cannot open database {path}: ")):
        await open_store(path)


async def test_a_path_that_cannot_be_opened_is_a_store_error(
    open_store: Opener, tmp_path: Path
) -> None:
    with pytest.raises(StoreError) as caught:
        await open_store(tmp_path)  # a folder, not a file

    assert str(caught.value) == f"cannot open database {tmp_path}: unable to open database file"


async def test_a_file_that_is_not_a_database_is_a_store_error(
    open_store: Opener, tmp_path: Path
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not the pages you are looking for\n" * 50)

    with pytest.raises(StoreError) as caught:
        await open_store(path)

    assert str(caught.value).startswith(f"cannot open database {path}: file is not a database")
    assert "\n" not in str(caught.value)


async def test_a_closed_store_says_so(open_store: Opener) -> None:
    store = await open_store()
    await store.close()
    await store.close()

    with pytest.raises(StoreError, match="closed"):
        await store.get_dispatch(1)


# -- two processes on one database ----------------------------------------------------------


async def test_cli_and_daemon_reserving_the_same_key_make_one_dispatch(
    open_store: Opener, db_path: Path
) -> None:
    cli, daemon = await open_store(), await open_store()
    news = [NewDispatch(task="t", params={"n": n}, key=f"k{n}") for n in range(25)]

    answers = await asyncio.gather(
        *(store.check_and_reserve(new, NOW) for new in news for store in (cli, daemon))
    )

    for n in range(25):
        pair = answers[2 * n : 2 * n + 2]
        assert pair[0].id == pair[1].id
        assert sorted(answer.created for answer in pair) == [False, True]
    with raw(db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM dispatches").fetchone() == (25,)


async def test_two_claimers_never_take_the_same_dispatch(open_store: Opener) -> None:
    one, two = await open_store(), await open_store()
    await one.reserve_many([NewDispatch(task="t", params={"n": n}) for n in range(40)], NOW)

    async def drain(store: SQLiteStore, instance: str) -> list[int]:
        taken: list[int] = []
        while (dispatch := await store.claim_next(instance, NOW, ())) is not None:
            taken.append(dispatch.id)
        return taken

    takes = await asyncio.gather(drain(one, "a"), drain(two, "b"), drain(one, "c"))

    every_take = [dispatch_id for taken in takes for dispatch_id in taken]
    assert sorted(every_take) == list(range(1, 41))
    planning = await one.list_dispatches(DispatchStatus.PLANNING, limit=100)
    assert len(planning) == 40


async def test_a_locked_database_is_store_busy(open_store: Opener, db_path: Path) -> None:
    store = await open_store(busy_timeout_ms=50)
    with raw(db_path) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreBusy) as caught:
                await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)
        finally:
            other.execute("ROLLBACK")

    assert caught.value.exit_code == EX_TEMPFAIL
    assert str(db_path) in str(caught.value) and "\n" not in str(caught.value)
    assert (await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)).created


async def test_a_cancelled_caller_leaves_the_batch_whole_and_the_store_usable(
    open_store: Opener,
) -> None:
    """A queued write runs to its end as one unit, whether or not its caller waits."""
    store = await open_store()
    news = [NewDispatch(task="t", params={"n": n}, key=f"k{n}") for n in range(200)]
    task = asyncio.create_task(store.reserve_many(news, NOW))
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    answer = await store.check_and_reserve(NewDispatch(task="t", params={}, key="after"), NOW)

    assert answer.created
    keys = [d.key for d in await store.list_dispatches(limit=500)]
    assert keys[0] == "after"
    assert len(keys) in (1, 201)  # all of the batch or none of it


# -- schema and storage format ----------------------------------------------------------------


async def test_timestamps_are_fixed_width_utc_text(open_store: Opener, db_path: Path) -> None:
    store = await open_store()
    await store.check_and_reserve(NewDispatch(task="t", params={}), NOW.replace(microsecond=0))

    with raw(db_path) as db:
        (created_at,) = db.execute("SELECT created_at FROM dispatches").fetchone()

    assert created_at == "2026-11-29T02:35:45.000000Z"
    assert from_db_time(created_at) == NOW.replace(microsecond=0)
    assert to_db_time(NOW) == "2026-11-29T02:35:45.123456Z"


async def test_claim_is_served_by_the_claim_index(open_store: Opener, db_path: Path) -> None:
    await open_store()
    params = {"instance_id": "i", "now": to_db_time(NOW), "blocked_gates": "[]", "limit": 16}

    with raw(db_path) as db:
        plan = db.execute("EXPLAIN QUERY PLAN " + query("claim_many"), params).fetchall()

    assert any("dispatches_claim" in row[-1] for row in plan), plan


async def test_schema_constraints_hold(open_store: Opener, db_path: Path) -> None:
    store = await open_store()
    answer = await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)
    await store.start_attempt(answer.id, 0, "s", "r", 1, "i", NOW)
    await store.flush()

    with raw(db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM attempts").fetchone() == (1,)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute("UPDATE dispatches SET status = 'sleeping'")
        db.execute("DELETE FROM dispatches WHERE id = ?", (answer.id,))
        assert db.execute("SELECT COUNT(*) FROM attempts").fetchone() == (0,)


async def test_a_refused_write_leaves_its_neighbours_landed_and_is_reported(
    open_store: Opener, db_path: Path
) -> None:
    """A queued write that the database refuses (here: a foreign key) cannot be raised to
    a caller that did not wait: the batch is written again one write at a time, the
    others land, and the refusal is logged and handed to the store's `on_refused`."""
    store = await open_store()
    good = await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)
    refused: list[tuple[str, int]] = []
    store._writes.on_refused = lambda name, row, exc: refused.append((name, row["id"]))

    with capture_logs() as events:
        before = await store.start_attempt(good.id, 0, "s", "r", 1, "i", NOW)
        bad = await store.start_attempt(999, 0, "s", "r", 1, "i", NOW)  # no dispatch 999
        after = await store.start_attempt(good.id, 0, "s", "r", 2, "i", NOW)
        row_id = await store.mirror_open("global", "dispatch:1", "i", NOW)
        await store.flush()

    assert refused == [("insert_attempt", bad)]
    (event,) = [e for e in events if e["event"] == "store_write_refused"]
    assert "FOREIGN KEY" in event["error"]
    with raw(db_path) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM attempts ORDER BY id")]
        gates = [row[0] for row in db.execute("SELECT id FROM gates")]
    assert ids == [before, after]
    assert gates == [row_id]


async def test_a_batch_whose_begin_failed_writes_nothing_outside_its_transaction(
    open_store: Opener, db_path: Path
) -> None:
    """A batch's statements are sent together with its `BEGIN`, so they run even when
    that `BEGIN` gave up (busy). They must then write nothing: run alone, in autocommit,
    their rows would land outside the batch, and the batch's next try would be refused
    as duplicates of its own rows."""
    store = await open_store(busy_timeout_ms=50)
    answer = await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)
    refused: list[tuple[str, str]] = []
    store._writes.on_refused = lambda name, row, exc: refused.append((name, str(exc)))
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # the write lock: the batch's first BEGIN fails
    seen: list[str] = []

    def statement_starts(sql: str) -> None:  # on the store's thread
        if seen and other.in_transaction:  # what runs after the failed BEGIN finds it free
            other.execute("COMMIT")
        if seen or sql.startswith("BEGIN"):
            seen.append(sql.split()[0])

    await store.trace(statement_starts)
    with capture_logs() as events:
        attempt = await store.start_attempt(answer.id, 0, "s", "r", 1, "i", NOW)
        await asyncio.wait_for(store.flush(), 10)
    await store.trace(None)
    other.close()

    assert seen[0] == "BEGIN"
    assert "database_unavailable" in [e["event"] for e in events]  # the BEGIN did fail
    assert refused == []
    with raw(db_path) as db:
        assert db.execute("SELECT id FROM attempts").fetchall() == [(attempt,)]


def test_split_statements_follows_sqlite_tokens() -> None:
    script = "-- a; comment\nCREATE TABLE a (x TEXT DEFAULT ';');\n\nSELECT 1;\n-- trailing\n"

    assert split_statements(script) == [
        "-- a; comment\nCREATE TABLE a (x TEXT DEFAULT ';');",
        "SELECT 1;",
    ]
    with pytest.raises(ValueError, match="incomplete"):
        split_statements("SELECT 1")


def test_parse_queries_refuses_duplicate_names() -> None:
    assert parse_queries("-- name: a\nSELECT 1;\n-- name: b\nSELECT 2;\n") == {
        "a": "SELECT 1;",
        "b": "SELECT 2;",
    }
    with pytest.raises(ValueError, match="duplicate"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
