"""Purge and retention verbs, the same on every `Store` backend."""

from __future__ import annotations

from dispatcher.models import AttemptStatus, DispatchStatus, ExpiredDispatches
from dispatcher.store.base import Store
from dispatcher.testing import FakeClock

from .conftest import Reserve, all_slot_rows

INSTANCE = "instance-1"


async def released_slot(store: Store, clock: FakeClock, holder: str) -> int:
    slot = await store.open_slot("global", holder, INSTANCE, clock.now())
    assert await store.close_slot(slot, clock.now())
    return slot


async def finished(
    store: Store,
    clock: FakeClock,
    reserve: Reserve,
    status: DispatchStatus = DispatchStatus.SUCCEEDED,
    key: str | None = None,
    attempts: int = 1,
) -> int:
    """A dispatch claimed, run `attempts` times and finished at `clock.now()`."""
    dispatch_id = (await reserve(params={"n": key}, key=key)).id
    claimed = await store.claim_next(INSTANCE, clock.now(), ())
    assert claimed is not None and claimed.id == dispatch_id
    for number in range(1, attempts + 1):
        attempt = await store.start_attempt(
            dispatch_id, 0, "a", "noop", number, INSTANCE, clock.now()
        )
        ok = status is DispatchStatus.SUCCEEDED
        outcome = AttemptStatus.SUCCEEDED if ok else AttemptStatus.FAILED
        store.finish_attempt(attempt, outcome, clock.now())
    store.finish_dispatch(dispatch_id, status, clock.now())
    return dispatch_id


# -- gate rows -------------------------------------------------------------------------------


async def test_purge_deletes_only_rows_released_before_the_cutoff(
    store: Store, clock: FakeClock
) -> None:
    old = await released_slot(store, clock, "dispatch:1")
    clock.advance(10)
    cutoff = clock.now()
    at_cutoff = await released_slot(store, clock, "dispatch:2")
    clock.advance(10)
    young = await released_slot(store, clock, "dispatch:3")

    assert await store.count_purgeable(cutoff) == 1
    assert await store.purge_released(cutoff, 100) == 1
    assert [row.id for row in await all_slot_rows(store)] == [at_cutoff, young]
    assert old not in {row.id for row in await all_slot_rows(store)}
    assert await store.count_purgeable(cutoff) == 0


async def test_purge_never_deletes_a_held_row(store: Store, clock: FakeClock) -> None:
    held = await store.open_slot("global", "dispatch:1", INSTANCE, clock.now())
    clock.advance(365 * 86400)
    assert await store.count_purgeable(clock.now()) == 0
    assert await store.purge_released(clock.now(), 100) == 0
    assert [row.id for row in await store.held_slots()] == [held]


async def test_purge_takes_one_batch_oldest_first(store: Store, clock: FakeClock) -> None:
    slots = []
    for number in range(5):
        slots.append(await released_slot(store, clock, f"dispatch:{number}"))
        clock.advance(1)

    assert await store.purge_released(clock.now(), 2) == 2
    assert [row.id for row in await all_slot_rows(store)] == slots[2:]
    assert await store.purge_released(clock.now(), 2) == 2
    assert await store.purge_released(clock.now(), 2) == 1
    assert await store.purge_released(clock.now(), 2) == 0
    assert await all_slot_rows(store) == []


async def test_a_purged_slot_id_is_never_reused(store: Store, clock: FakeClock) -> None:
    first = await released_slot(store, clock, "dispatch:1")
    clock.advance(1)
    assert await store.purge_released(clock.now(), 10) == 1
    second = await store.open_slot("global", "dispatch:2", INSTANCE, clock.now())
    assert second > first
    # A late release of the purged row cannot free the new holder.
    assert await store.close_slot(first, clock.now()) is False
    assert [row.id for row in await store.held_slots()] == [second]


async def test_gate_counts_after_a_purge(store: Store, clock: FakeClock) -> None:
    await released_slot(store, clock, "dispatch:1")
    await store.open_slot("global", "dispatch:2", INSTANCE, clock.now())
    clock.advance(1)
    await store.purge_released(clock.now(), 10)
    counts = await store.gate_row_counts()
    assert (counts.held, counts.released) == (1, 0)


# -- retention -------------------------------------------------------------------------------


async def test_retention_deletes_finished_dispatches_with_their_attempts(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    old_ok = await finished(store, clock, reserve, attempts=2)
    old_failed = await finished(store, clock, reserve, DispatchStatus.FAILED)
    clock.advance(10)
    cutoff = clock.now()
    young = await finished(store, clock, reserve)

    assert await store.count_expired_dispatches(cutoff) == ExpiredDispatches(2, 3)
    assert await store.purge_finished_dispatches(cutoff, 100) == ExpiredDispatches(2, 3)
    assert await store.get_dispatch(old_ok) is None
    assert await store.get_dispatch(old_failed) is None
    assert await store.list_attempts(old_ok) == []
    assert await store.get_dispatch(young) is not None
    assert len(await store.list_attempts(young)) == 1
    assert await store.count_expired_dispatches(cutoff) == ExpiredDispatches(0, 0)


async def test_retention_never_deletes_unfinished_dispatches(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    queued = (await reserve()).id
    running = (await reserve()).id
    claimed = await store.claim_next(INSTANCE, clock.now(), ())
    assert claimed is not None and claimed.id == queued
    await store.start_attempt(queued, 0, "a", "noop", 1, INSTANCE, clock.now())
    clock.advance(1000 * 86400)

    assert await store.purge_finished_dispatches(clock.now(), 100) == ExpiredDispatches(0, 0)
    assert {d.id for d in await store.list_dispatches()} == {queued, running}
    assert len(await store.list_attempts(queued)) == 1


async def test_retention_takes_one_batch_oldest_first(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    ids = []
    for _ in range(3):
        ids.append(await finished(store, clock, reserve))
        clock.advance(1)
    assert await store.purge_finished_dispatches(clock.now(), 2) == ExpiredDispatches(2, 2)
    assert [d.id for d in await store.list_dispatches()] == [ids[2]]


async def test_keys_of_retained_dispatches_keep_answering(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    expired = await finished(store, clock, reserve, key="old")
    clock.advance(10)
    cutoff = clock.now()
    retained = await finished(store, clock, reserve, key="new")

    await store.purge_finished_dispatches(cutoff, 100)

    again = await reserve(params={"n": "new"}, key="new")
    assert (again.id, again.created, again.status) == (retained, False, DispatchStatus.SUCCEEDED)
    # The expired dispatch's key is free: the same submission is a new dispatch.
    fresh = await reserve(params={"n": "old"}, key="old")
    assert fresh.created and fresh.id != expired


# -- space -----------------------------------------------------------------------------------


async def test_reclaim_space_and_optimize_on_an_empty_store(store: Store) -> None:
    assert await store.reclaim_space() == 0
    await store.optimize()
