"""What only the SQLite store does for the purge: query plans, auto-vacuum, space."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dispatcher import purge
from dispatcher.config import Settings
from dispatcher.store.sql import statements
from dispatcher.store.sqlite import SQLiteStore, to_db_time
from dispatcher.testing import FakeClock

NOW = datetime(2026, 11, 29, 3, 17, tzinfo=UTC)


def query(name: str) -> str:
    """A named statement of the SQLite store."""
    return statements("dispatcher.store.sqlite")[name]


def plan(db_path: Path, name: str, params: dict[str, object]) -> list[str]:
    """The `EXPLAIN QUERY PLAN` details of a named statement."""
    with closing(sqlite3.connect(db_path)) as db:
        rows = db.execute(f"EXPLAIN QUERY PLAN {query(name)}", params).fetchall()
    return [row[3] for row in rows]


def seed_released_rows(db_path: Path, count: int, released: datetime) -> None:
    """`count` released gate rows, as the gate leaves them (bulk, for speed)."""
    stamp = to_db_time(released)
    with closing(sqlite3.connect(db_path)) as db, db:
        db.executemany(
            "INSERT INTO gates (gate, holder, instance_id, acquired_at, released_at)"
            " VALUES ('global', ?, 'i', ?, ?)",
            ((f"dispatch:{n}", stamp, stamp) for n in range(count)),
        )


def test_each_purge_batch_is_a_range_scan_of_the_released_at_index(
    store: SQLiteStore,
) -> None:
    details = plan(store.path, "purge_released", {"before": to_db_time(NOW), "batch_size": 5000})
    assert any("INDEX gates_released_at (released_at<?)" in d for d in details), details
    assert not any(d.startswith("SCAN gates") for d in details), details
    assert not any("TEMP B-TREE" in d for d in details), details  # no sort: index order


def test_each_retention_batch_is_a_range_scan_of_the_finished_at_index(
    store: SQLiteStore,
) -> None:
    params = {"before": to_db_time(NOW), "batch_size": 1000}
    for name in ("retention_dispatches", "retention_attempts"):
        details = plan(store.path, name, params)
        assert any("INDEX dispatches_finished_at (finished_at<?)" in d for d in details), details
        assert not any(d.startswith("SCAN") for d in details), (name, details)


def test_a_new_database_has_incremental_auto_vacuum(store: SQLiteStore) -> None:
    with closing(sqlite3.connect(store.path)) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_large_purge_gives_the_space_back(store: SQLiteStore) -> None:
    seed_released_rows(store.path, 20_000, NOW - timedelta(days=8))
    settings = Settings.model_validate({"purge": {"batch_size": 3000}})

    run = await purge.purge_gates(settings, store, FakeClock(NOW))

    assert (run.deleted, run.batches) == (20_000, 7)
    assert run.reclaimed_pages > 0
    with closing(sqlite3.connect(store.path)) as db:
        assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM gates").fetchone()[0] == 0


async def test_an_existing_database_without_auto_vacuum_still_purges(tmp_path: Path) -> None:
    """Made before issue 3: auto_vacuum stays NONE until a VACUUM; nothing is reclaimed."""
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE unrelated (x)")  # the file now has a schema: too late
    store = await SQLiteStore.open(path)
    try:
        seed_released_rows(path, 5000, NOW - timedelta(days=8))
        run = await purge.purge_gates(Settings(), store, FakeClock(NOW))
        assert (run.deleted, run.reclaimed_pages) == (5000, 0)
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    finally:
        await store.close()
