"""Fixtures of the store contract suite: every test runs on each `Store` backend."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from dispatcher.models import NewDispatch, Reservation, SlotRow
from dispatcher.store.base import Store
from dispatcher.store.postgres import PostgresStore
from dispatcher.store.sqlite import SQLiteStore
from dispatcher.testing import FakeClock, InMemoryStore
from tests.helpers import postgres

Reserve = Callable[..., Awaitable[Reservation]]


async def _open(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    if backend == "sqlite":
        return await SQLiteStore.open(tmp_path / "var" / "dispatcher.db")
    if backend == "postgres":
        url: str = request.getfixturevalue("pg_url")
        opened = await PostgresStore.open(url)
        await postgres.truncate(url)
        return opened
    return InMemoryStore()


@pytest.fixture(params=["sqlite", "memory", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh, empty store of each backend, closed after the test."""
    opened = await _open(request.param, tmp_path, request)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reserve(store: Store, clock: FakeClock) -> Reserve:
    """`await reserve(task="build", params=..., key=..., priority=..., gate_key=...)`."""

    async def _reserve(
        task: str = "build", params: dict[str, Any] | None = None, **kw: Any
    ) -> Reservation:
        new = NewDispatch(task=task, params=params if params is not None else {}, **kw)
        return await store.check_and_reserve(new, clock.now())

    return _reserve


async def all_slot_rows(store: Store) -> list[SlotRow]:
    """Every gate row, released ones too (the protocol lists held rows only)."""
    if isinstance(store, InMemoryStore):
        return [store.slots[slot_id] for slot_id in sorted(store.slots)]
    if isinstance(store, PostgresStore):
        await store.held_slots()  # writes the queued mirror rows first
        async with store._pool.acquire() as con:
            rows = await con.fetch("SELECT * FROM gates ORDER BY id")
        return [store.slot_from_row(row) for row in rows]
    assert isinstance(store, SQLiteStore)
    with closing(sqlite3.connect(store.path)) as db:
        db.row_factory = sqlite3.Row
        return [store.slot_from_row(row) for row in db.execute("SELECT * FROM gates ORDER BY id")]
