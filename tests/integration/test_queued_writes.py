"""The SQLite store's queued writes: what nobody waits for still lands, once, in order.

A no-op dispatch awaits no write of its own: its attempt's start and end, its gate
row's insert and release, its `advance` and final status are all queued, and two queued
writes of one row that meet in the queue become one statement. These tests read the
file with a separate connection and watch the statements the store's connection runs.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dispatcher.models import AttemptStatus, DispatchStatus, NewDispatch, Step
from dispatcher.store.sqlite import SQLiteStore
from dispatcher.store.sqlite.store import ROWS_PER_STATEMENT

NOW = datetime(2026, 11, 29, 6, 0, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=2)


@contextmanager
def raw(store: SQLiteStore) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(store.path, isolation_level=None)) as db:
        yield db


async def statements(store: SQLiteStore) -> list[str]:
    """Every statement the store's connection runs from now on."""
    seen: list[str] = []
    await store.trace(seen.append)
    return seen


def writes_to(seen: list[str], table: str) -> list[str]:
    """INSERT / UPDATE, in order, of the statements on `table` (a batch's statement
    starts with its rows, `WITH r (...) AS (VALUES ...)`, on a line of their own)."""
    kinds = []
    for text in seen:
        lines = text.splitlines()
        code = "\n".join(line for line in lines if not line.lstrip().startswith(("--", "WITH r")))
        match = re.match(r"\s*(INSERT INTO|UPDATE)\s+(\w+)", code)
        if match and match.group(2) == table:
            kinds.append(match.group(1).split()[0])
    return kinds


async def running_dispatch(store: SQLiteStore) -> int:
    reservation = await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)
    claimed = await store.claim_next("me", NOW, ())
    assert claimed is not None and claimed.id == reservation.id
    return claimed.id


async def test_an_attempt_that_ends_before_its_insert_is_written_as_one_complete_row(
    store: SQLiteStore,
) -> None:
    dispatch_id = await running_dispatch(store)
    seen = await statements(store)

    attempt_id = await store.start_attempt(dispatch_id, 0, "a", "noop", 1, "me", NOW)
    store.finish_attempt(attempt_id, AttemptStatus.SUCCEEDED, LATER, exit_code=0)
    await store.flush()

    assert writes_to(seen, "attempts") == ["INSERT"]
    with raw(store) as db:
        row = db.execute(
            "SELECT id, status, started_at, ended_at, exit_code FROM attempts"
        ).fetchone()
    assert row == (attempt_id, "succeeded", "2026-11-29T06:00:00.000000Z",
                   "2026-11-29T06:00:02.000000Z", 0)  # fmt: skip


async def test_a_durable_start_is_updated_by_its_end(store: SQLiteStore) -> None:
    dispatch_id = await running_dispatch(store)
    attempt_id = await store.start_attempt(dispatch_id, 0, "a", "exec", 1, "me", NOW)
    await store.flush()
    with raw(store) as db:  # what a step with effects may rely on before it runs
        assert db.execute("SELECT status FROM attempts").fetchall() == [("running",)]
    seen = await statements(store)

    store.finish_attempt(attempt_id, AttemptStatus.FAILED, LATER, exit_code=3, error="x")
    store.finish_attempt(attempt_id, AttemptStatus.SUCCEEDED, LATER)  # too late
    await store.flush()

    assert writes_to(seen, "attempts") == ["UPDATE"]
    with raw(store) as db:
        assert db.execute("SELECT status, exit_code, error FROM attempts").fetchall() == [
            ("failed", 3, "x")
        ]


async def test_attempt_ids_are_never_reused_even_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    store = await SQLiteStore.open(path)
    dispatch_id = await running_dispatch(store)
    first = await store.start_attempt(dispatch_id, 0, "a", "noop", 1, "me", NOW)
    second = await store.start_attempt(dispatch_id, 0, "a", "noop", 2, "me", NOW)
    await store.close()
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("DELETE FROM attempts WHERE id = ?", (second,))

    store = await SQLiteStore.open(path)
    try:
        third = await store.start_attempt(dispatch_id, 0, "a", "noop", 3, "me", NOW)
        await store.flush()
    finally:
        await store.close()

    assert (first, second, third) == (first, first + 1, first + 2)
    with closing(sqlite3.connect(path)) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM attempts ORDER BY id")]
    assert ids == [first, third]


async def test_a_gate_row_released_before_its_insert_is_written_once_with_both_times(
    store: SQLiteStore,
) -> None:
    seen = await statements(store)

    row_id = await store.mirror_open("global", "dispatch:1", "me", NOW)
    store.mirror_close(row_id, LATER)
    store.mirror_close(row_id, LATER + timedelta(seconds=5))  # released once only
    await store.flush()

    assert writes_to(seen, "gates") == ["INSERT"]
    with raw(store) as db:
        rows = db.execute("SELECT gate, acquired_at, released_at FROM gates").fetchall()
    assert rows == [("global", "2026-11-29T06:00:00.000000Z", "2026-11-29T06:00:02.000000Z")]


async def test_a_gate_row_written_held_is_released_by_an_update(store: SQLiteStore) -> None:
    row_id = await store.mirror_open("global", "dispatch:1", "me", NOW)
    await store.flush()
    with raw(store) as db:
        assert db.execute("SELECT released_at FROM gates").fetchall() == [(None,)]

    store.mirror_close(row_id, LATER)
    await store.flush()

    with raw(store) as db:
        released = db.execute("SELECT released_at FROM gates").fetchall()
    assert released == [("2026-11-29T06:00:02.000000Z",)]


async def test_the_last_advance_is_written_with_the_final_status(store: SQLiteStore) -> None:
    dispatch_id = await running_dispatch(store)
    plan = [Step(name="a", runner="noop"), Step(name="b", runner="noop")]
    await store.save_plan(dispatch_id, plan, NOW)
    await store.advance(dispatch_id, 1, NOW)
    await store.flush()
    seen = await statements(store)

    await store.advance(dispatch_id, 2, LATER)
    store.finish_dispatch(dispatch_id, DispatchStatus.SUCCEEDED, LATER)
    await store.flush()

    assert writes_to(seen, "dispatches") == ["UPDATE"]
    final = await store.get_dispatch(dispatch_id)
    assert final is not None
    assert (final.status, final.current_step) == (DispatchStatus.SUCCEEDED, 2)


@pytest.mark.parametrize(
    ("advanced", "status", "step"),
    [(True, DispatchStatus.SUCCEEDED, 1), (False, DispatchStatus.FAILED, 0)],
)
async def test_a_plan_still_queued_is_written_with_the_final_status(
    store: SQLiteStore, advanced: bool, status: DispatchStatus, step: int
) -> None:
    dispatch_id = await running_dispatch(store)
    seen = await statements(store)

    await store.save_plan(dispatch_id, [Step(name="a", runner="noop")], NOW)
    if advanced:
        await store.advance(dispatch_id, 1, NOW)
    store.finish_dispatch(dispatch_id, status, LATER)
    await store.flush()

    assert writes_to(seen, "dispatches") == ["UPDATE"]
    final = await store.get_dispatch(dispatch_id)
    assert final is not None
    assert (final.status, final.current_step) == (status, step)
    assert final.plan == (Step(name="a", runner="noop"),)


async def test_queued_writes_are_seen_by_the_next_read_and_survive_close(
    tmp_path: Path,
) -> None:
    path = tmp_path / "d.db"
    store = await SQLiteStore.open(path)
    dispatch_id = await running_dispatch(store)
    attempt_id = await store.start_attempt(dispatch_id, 0, "a", "noop", 1, "me", NOW)

    (attempt,) = await store.list_attempts(dispatch_id)  # ordered after the insert
    assert attempt.id == attempt_id

    store.finish_attempt(attempt_id, AttemptStatus.SUCCEEDED, LATER)
    store.finish_dispatch(dispatch_id, DispatchStatus.SUCCEEDED, LATER)
    await store.close()  # nothing awaited them: close writes them

    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT status FROM attempts").fetchall() == [("succeeded",)]
        assert db.execute("SELECT status FROM dispatches").fetchall() == [("succeeded",)]


async def test_a_claim_runs_ahead_of_queued_writes_and_commits_on_its_own(
    store: SQLiteStore,
) -> None:
    """The loop waits for its claim while the writes of the work it just ran have nobody
    waiting: the claim goes first, committed alone, and the writes follow."""
    finished = await running_dispatch(store)
    waiting = (await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)).id
    seen = await statements(store)

    store.finish_dispatch(finished, DispatchStatus.SUCCEEDED, LATER)  # queued
    claimed = await store.claim_many("me", NOW, (), 5)
    await store.flush()

    assert [d.id for d in claimed] == [waiting]
    assert transactions(seen) == [["claim"], ["update dispatches"]]
    with raw(store) as db:
        rows = db.execute("SELECT id, status FROM dispatches ORDER BY id").fetchall()
    assert rows == [(finished, "succeeded"), (waiting, "planning")]


async def batch_out(store: SQLiteStore) -> asyncio.Task[None]:
    """Start writing what is queued; return once the batch holds the connection."""
    flushing = asyncio.create_task(store.flush())
    for _ in range(1000):
        if store._riders is not None:
            return flushing
        await asyncio.sleep(0)
    raise AssertionError("the batch never took the connection")


async def test_a_claim_asked_for_while_a_batch_is_out_rides_in_its_transaction(
    store: SQLiteStore,
) -> None:
    """The next claim comes as the last dispatches end, while their writes are out: it
    goes out with the batch's COMMIT instead of one round trip after it, and is answered
    once that COMMIT has succeeded."""
    finished = await running_dispatch(store)
    waiting = (await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)).id
    seen = await statements(store)

    store.finish_dispatch(finished, DispatchStatus.SUCCEEDED, LATER)  # queued
    flushing = await batch_out(store)
    claimed = await store.claim_many("me", NOW, (), 5)
    await flushing

    assert [d.id for d in claimed] == [waiting]
    assert transactions(seen) == [["update dispatches", "claim"]]
    with raw(store) as db:
        rows = db.execute("SELECT id, status FROM dispatches ORDER BY id").fetchall()
    assert rows == [(finished, "succeeded"), (waiting, "planning")]


async def test_a_claim_cancelled_while_it_waits_to_ride_is_not_sent(store: SQLiteStore) -> None:
    """Nobody would start what such a claim took: its dispatches would sit claimed
    until the self-check put them back."""
    finished = await running_dispatch(store)
    waiting = (await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)).id
    seen = await statements(store)

    store.finish_dispatch(finished, DispatchStatus.SUCCEEDED, LATER)  # queued
    flushing = await batch_out(store)
    claiming = asyncio.create_task(store.claim_many("me", NOW, (), 5))
    await asyncio.sleep(0)  # it waits to ride
    claiming.cancel()
    await flushing

    assert claiming.cancelled()
    assert transactions(seen) == [["update dispatches"]]
    with raw(store) as db:
        assert db.execute("SELECT status FROM dispatches WHERE id = ?", (waiting,)).fetchone() == (
            "queued",
        )


async def test_a_claim_that_rode_with_a_failed_batch_goes_out_again_on_its_own(
    store: SQLiteStore,
) -> None:
    """A batch refused (here a write of an attempt of no dispatch) is undone whole, the
    claim that waited to ride with it too: the claim then runs alone, and its answer is
    what that run committed."""
    await running_dispatch(store)
    waiting = (await store.check_and_reserve(NewDispatch(task="t", params={}), NOW)).id
    store._writes.on_refused = lambda name, row, exc: None
    seen = await statements(store)

    await store.start_attempt(999, 0, "a", "noop", 1, "me", NOW)  # no dispatch 999
    flushing = await batch_out(store)
    claimed = await store.claim_many("me", NOW, (), 5)
    await flushing

    assert [d.id for d in claimed] == [waiting]
    assert ["claim"] in transactions(seen)  # alone, after the batch's failure
    with raw(store) as db:
        assert db.execute("SELECT status FROM dispatches WHERE id = ?", (waiting,)).fetchone() == (
            "planning",
        )
        assert db.execute("SELECT count(*) FROM attempts").fetchone() == (0,)


async def test_writes_queued_in_one_turn_go_out_in_one_transaction(store: SQLiteStore) -> None:
    """Group commit: one BEGIN ... COMMIT for everything queued together, one statement
    per kind of write with all of its rows."""
    dispatch_id = await running_dispatch(store)
    await store.start_attempt(dispatch_id, 0, "a", "noop", 9, "me", NOW)  # ids read once
    await store.mirror_open("runner:x", "warm", "me", NOW)
    await store.flush()
    seen = await statements(store)

    attempts = [
        await store.start_attempt(dispatch_id, 0, "a", "noop", n, "me", NOW) for n in (1, 2, 3)
    ]
    row_ids = [await store.mirror_open("runner:x", f"h{n}", "me", NOW) for n in range(4)]
    await store.advance(dispatch_id, 1, NOW)
    await store.flush()

    assert transactions(seen) == [["insert attempts", "insert gates", "update dispatches"]]
    with raw(store) as db:
        assert db.execute("SELECT count(*) FROM attempts").fetchone() == (len(attempts) + 1,)
        assert db.execute("SELECT count(*) FROM gates").fetchone() == (len(row_ids) + 1,)


async def test_a_large_batch_goes_out_in_statements_of_at_most_so_many_rows(
    store: SQLiteStore,
) -> None:
    """Rows of one kind go out `ROWS_PER_STATEMENT` to a statement (a bounded number of
    statement texts), still in one transaction, and every one of them lands."""
    await store.mirror_open("runner:x", "warm", "me", NOW)  # ids read once
    await store.flush()
    seen = await statements(store)
    count = 2 * ROWS_PER_STATEMENT + 3

    row_ids = [await store.mirror_open("runner:x", f"h{n}", "me", NOW) for n in range(count)]
    await store.flush()

    assert transactions(seen) == [["insert gates"] * 3]
    with raw(store) as db:
        landed = [row[0] for row in db.execute("SELECT id FROM gates WHERE holder <> 'warm'")]
    assert sorted(landed) == sorted(row_ids)


def transactions(seen: list[str]) -> list[list[str]]:
    """The writes of each transaction, in order; the claim by name. A statement outside
    BEGIN ... COMMIT is a transaction of its own."""
    found: list[list[str]] = []
    inside = False
    for text in seen:
        lines = text.splitlines()
        code = " ".join(line for line in lines if not line.lstrip().startswith(("--", "WITH r")))
        if code.startswith("BEGIN"):
            found.append([])
            inside = True
            continue
        if code.startswith(("COMMIT", "ROLLBACK")):
            inside = False
            continue
        if "claims = claims + 1" in code:
            write = "claim"
        elif match := re.match(r"\s*(INSERT INTO|UPDATE)\s+(\w+)", code):
            write = f"{match.group(1).split()[0].lower()} {match.group(2)}"
        else:
            continue
        if not inside:
            found.append([])
        found[-1].append(write)
    return [writes for writes in found if writes]
