"""The write queue on the loop's side: batches, folding, retries, refusals, damage.

A fake `write_batch` stands in for the database; it records each batch it is given
and fails as a test tells it to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from dispatcher.errors import DatabaseCorrupt, LeaseLost, StoreBusy, StoreError, StoreUnwritable
from dispatcher.store import writes
from dispatcher.store.writes import WriteBatch, WriteBuffer


class FakeDatabase:
    """Takes batches; `fail(...)` makes the next tries raise, `refuse(id)` refuses a row."""

    def __init__(self) -> None:
        self.batches: list[WriteBatch] = []
        self.rows: list[tuple[str, Any]] = []
        self._failures: list[Exception] = []
        self._refused: set[Any] = set()
        self._row_failures: dict[Any, Exception] = {}

    def fail(self, *errors: Exception) -> None:
        self._failures.extend(errors)

    def refuse(self, row_id: Any) -> None:
        self._refused.add(row_id)

    def fail_once_on(self, row_id: Any, error: Exception) -> None:
        """The next write of `row_id` alone raises `error`."""
        self._row_failures[row_id] = error

    async def write_batch(self, batch: WriteBatch) -> None:
        await asyncio.sleep(0)
        self.batches.append(batch)
        if self._failures:
            raise self._failures.pop(0)
        ids = [row["id"] for _, rows in batch for row in rows]
        if len(ids) == 1 and ids[0] in self._row_failures:
            raise self._row_failures.pop(ids[0])
        if any(row["id"] in self._refused for _, rows in batch for row in rows):
            raise StoreError("refused: a constraint")
        self.rows += [(name, row["id"]) for name, rows in batch for row in rows]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writes, "RETRY_FIRST", 0.001)
    monkeypatch.setattr(writes, "RETRY_MAX", 0.002)


def buffer(db: FakeDatabase, **hooks: Callable[..., None]) -> WriteBuffer:
    return WriteBuffer(db.write_batch, "fake.db", **hooks)


async def test_writes_of_one_turn_go_out_as_one_batch_in_statement_order() -> None:
    db = FakeDatabase()
    queue = buffer(db)
    queue.put("write_progress", 1, {"id": 1})
    queue.put("insert_attempt", 7, {"id": 7})
    queue.put("insert_slot", 3, {"id": 3})
    await queue.flush()

    assert [[name for name, _ in batch] for batch in db.batches] == [
        ["insert_attempt", "insert_slot", "write_progress"]
    ]


async def test_a_second_write_of_a_row_folds_into_the_queued_one() -> None:
    db = FakeDatabase()
    queue = buffer(db)
    queue.put("write_progress", 1, {"id": 1, "step": 1})
    queue.put("write_progress", 1, {"status": "done"}, fold="merge")
    queue.put("finish_attempt", 2, {"id": 2, "status": "failed"}, fold="first")
    queue.put("finish_attempt", 2, {"id": 2, "status": "succeeded"}, fold="first")
    queued = queue.queued_write("write_progress", 1)
    await queue.flush()

    assert queued == {"id": 1, "step": 1, "status": "done"}
    ((_, finishes),) = [kind for kind in db.batches[0] if kind[0] == "finish_attempt"]
    assert finishes == [{"id": 2, "status": "failed"}]  # the first end wins
    assert queue.queued_write("write_progress", 1) is None  # gone out: no more folding


async def test_a_database_that_cannot_take_writes_is_tried_until_they_land() -> None:
    db = FakeDatabase()
    back: list[bool] = []
    queue = buffer(db, on_available=lambda: back.append(True))
    db.fail(StoreUnwritable("disk full"), StoreBusy("locked"), StoreUnwritable("read-only"))
    with capture_logs() as logged:
        queue.put("insert_attempt", 1, {"id": 1})
        await queue.flush()

    assert db.rows == [("insert_attempt", 1)]
    assert len(db.batches) == 4  # three failed tries, then it landed
    events = [entry["event"] for entry in logged]
    assert events == ["database_unavailable", "database_available"]  # once each
    assert logged[0]["error"] == "disk full" and "duration_ms" in logged[1]
    assert back == [True]


async def test_a_read_does_not_wait_for_an_outage_to_end_but_a_flush_does() -> None:
    db = FakeDatabase()
    queue = buffer(db)
    db.fail(*[StoreUnwritable("read-only")] * 50)
    queue.put("insert_attempt", 1, {"id": 1})
    flushed = asyncio.ensure_future(queue.flush())

    await asyncio.wait_for(queue.settle(), 5)  # returns once the outage is known

    assert queue.outage_since is not None and not flushed.done()
    await asyncio.wait_for(flushed, 5)
    assert db.rows == [("insert_attempt", 1)]


async def test_a_refused_write_leaves_its_neighbours_landed_and_is_reported() -> None:
    db = FakeDatabase()
    refused: list[tuple[str, Any, str]] = []
    queue = buffer(
        db, on_refused=lambda name, row, exc: refused.append((name, row["id"], str(exc)))
    )
    db.refuse(2)
    with capture_logs() as logged:
        for row_id in (1, 2, 3):
            queue.put("insert_attempt", row_id, {"id": row_id})
        queue.put("write_progress", 9, {"id": 9})
        await queue.flush()

    assert db.rows == [("insert_attempt", 1), ("insert_attempt", 3), ("write_progress", 9)]
    assert refused == [("insert_attempt", 2, "refused: a constraint")]
    assert [entry["event"] for entry in logged] == ["store_write_refused"]


async def test_the_caller_awaiting_a_refused_write_is_told_and_its_neighbours_land() -> None:
    db = FakeDatabase()
    queue = buffer(db)
    db.refuse(2)
    for row_id in (1, 2, 3):
        queue.put("insert_attempt", row_id, {"id": row_id})
    waits = [asyncio.ensure_future(queue.landed("insert_attempt", i)) for i in (1, 2, 3)]
    answers = await asyncio.gather(*waits, return_exceptions=True)

    assert answers[0] is None and answers[2] is None
    assert isinstance(answers[1], StoreError) and "constraint" in str(answers[1])
    assert db.rows == [("insert_attempt", 1), ("insert_attempt", 3)]
    assert len(db.batches[0][0][1]) == 3  # they went out as one batch first
    await queue.landed("insert_attempt", 1)  # landed long ago: at once


async def test_the_caller_awaiting_a_fenced_write_is_told() -> None:
    db = FakeDatabase()
    queue = buffer(db)
    db.fail(LeaseLost("instance a was reaped"))
    queue.put("insert_attempt", 1, {"id": 1})
    with capture_logs(), pytest.raises(LeaseLost):
        await queue.landed("insert_attempt", 1)


async def test_an_outage_while_writing_one_by_one_writes_each_once() -> None:
    db = FakeDatabase()
    queue = buffer(db)
    db.refuse(2)
    # Written one by one, 1 lands, 2 is refused, then 3 meets an outage: tried again,
    # only 3 is written (1 would be a duplicate, 2 refused twice).
    db.fail_once_on(3, StoreUnwritable("full"))
    for row_id in (1, 2, 3):
        queue.put("insert_attempt", row_id, {"id": row_id})
    await queue.flush()

    assert db.rows == [("insert_attempt", 1), ("insert_attempt", 3)]
    assert [len(rows) for batch in db.batches[-2:] for _, rows in batch] == [1, 1]


async def test_a_damaged_database_is_never_retried_and_is_reported_once() -> None:
    db = FakeDatabase()
    fatal: list[DatabaseCorrupt] = []
    queue = buffer(db, on_fatal=fatal.append)
    db.fail(DatabaseCorrupt("malformed"))
    queue.put("insert_attempt", 1, {"id": 1})

    with pytest.raises(DatabaseCorrupt):
        await queue.flush()

    assert len(db.batches) == 1 and len(fatal) == 1
    queue.put("insert_attempt", 2, {"id": 2})  # ignored: nothing can land any more
    with pytest.raises(DatabaseCorrupt):
        await queue.flush()
    assert len(db.batches) == 1 and len(fatal) == 1


async def test_close_gives_up_after_its_patience_and_says_what_was_lost() -> None:
    db = FakeDatabase()
    queue = buffer(db)
    db.fail(*[StoreUnwritable("read-only")] * 10_000)
    queue.put("insert_attempt", 1, {"id": 1})
    queue.put("insert_slot", 2, {"id": 2})
    with capture_logs() as logged:
        lost = await queue.close(patience=0.05)

    assert lost == 2
    (entry,) = [e for e in logged if e["event"] == "store_writes_lost"]
    assert entry["writes"] == 2


async def test_close_writes_what_is_queued() -> None:
    db = FakeDatabase()
    queue = buffer(db)
    for row_id in range(100):
        queue.put("insert_attempt", row_id, {"id": row_id})

    assert await queue.close(patience=5) == 0
    assert len(db.rows) == 100


async def test_a_batch_refused_by_the_fence_is_dropped_and_its_flush_raises() -> None:
    db = FakeDatabase()
    lost: list[LeaseLost] = []
    queue = buffer(db, on_lease_lost=lost.append)
    db.fail(LeaseLost("instance a was reaped"))
    queue.put("insert_attempt", 1, {"id": 1})
    with capture_logs() as logged, pytest.raises(LeaseLost):
        await queue.flush()  # a step with effects waiting for its start must not run

    assert len(db.batches) == 1 and db.rows == []  # not retried
    assert len(lost) == 1
    assert [e["event"] for e in logged] == ["store_writes_fenced"]
    queue.put("insert_attempt", 2, {"id": 2})  # later writes (a new lease) still land
    await queue.flush()
    assert db.rows == [("insert_attempt", 2)]
