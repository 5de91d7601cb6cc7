"""The store's writer thread: queued jobs share a transaction but never each other's fate."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from dispatcher.store.writer import SQLiteWriter


async def make_writer(tmp_path: Path) -> SQLiteWriter:
    writer = SQLiteWriter(tmp_path / "w.db", busy_timeout=1.0)
    await writer.start()
    await writer.call(lambda db: db.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
    return writer


async def rows(writer: SQLiteWriter) -> list[int]:
    found: list[int] = await writer.call(
        lambda db: [r[0] for r in db.execute("SELECT x FROM t ORDER BY x")], write=False
    )
    return found


async def test_a_failing_queued_write_is_logged_and_its_neighbours_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = await make_writer(tmp_path)
    try:
        with caplog.at_level(logging.ERROR, logger="dispatcher.store"):
            writer.post(lambda db: db.execute("INSERT INTO t VALUES (1)"))
            writer.post(lambda db: db.execute("INSERT INTO missing VALUES (2)"))
            await writer.call(lambda db: db.execute("INSERT INTO t VALUES (3)"))
        assert await rows(writer) == [1, 3]
    finally:
        await writer.close()
    assert [r.getMessage() for r in caplog.records] == ["store_write_failed"]


async def test_an_atomic_job_that_fails_half_way_leaves_nothing(tmp_path: Path) -> None:
    writer = await make_writer(tmp_path)

    def two_inserts(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (5)")
        db.execute("INSERT INTO t VALUES (5)")  # primary key conflict

    try:
        writer.post(lambda db: db.execute("INSERT INTO t VALUES (4)"))
        with pytest.raises(sqlite3.IntegrityError):
            await writer.call(two_inserts, atomic=True)
        assert await rows(writer) == [4]
    finally:
        await writer.close()


async def test_close_writes_what_was_queued(tmp_path: Path) -> None:
    writer = await make_writer(tmp_path)
    for x in range(100):
        writer.post(lambda db, x=x: db.execute("INSERT INTO t VALUES (?)", (x,)))
    await writer.close()
    with sqlite3.connect(tmp_path / "w.db") as db:
        assert db.execute("SELECT COUNT(*) FROM t").fetchone() == (100,)
