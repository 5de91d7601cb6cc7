"""The purge and retention jobs with a fake clock and the in-memory store."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from dispatcher import purge, service
from dispatcher.config import Settings
from dispatcher.models import AttemptStatus, DispatchStatus, NewDispatch
from dispatcher.testing import FakeClock, InMemoryStore

DAY = 86400
INSTANCE = "instance-1"


def settings(**sections: dict[str, Any]) -> Settings:
    return Settings.model_validate(sections)


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def released_ago(store: InMemoryStore, clock: FakeClock, seconds: float) -> int:
    """A gate row released `seconds` before the clock's current time."""
    when = clock.now() - timedelta(seconds=seconds)
    slot = await store.open_slot("global", f"dispatch:{len(store.slots)}", INSTANCE, when)
    await store.close_slot(slot, when)
    return slot


async def finished_ago(
    store: InMemoryStore, clock: FakeClock, seconds: float, key: str | None = None
) -> int:
    """A dispatch with one attempt, finished `seconds` before the clock's time."""
    when = clock.now() - timedelta(seconds=seconds)
    new = NewDispatch(task="t", params={"key": key}, key=key)
    dispatch_id = (await store.check_and_reserve(new, when)).id
    claimed = await store.claim_next(INSTANCE, when, ())
    assert claimed is not None and claimed.id == dispatch_id
    attempt = await store.start_attempt(dispatch_id, 0, "a", "noop", 1, INSTANCE, when)
    store.finish_attempt(attempt, AttemptStatus.SUCCEEDED, when)
    store.finish_dispatch(dispatch_id, DispatchStatus.SUCCEEDED, when)
    return dispatch_id


# -- gate rows -------------------------------------------------------------------------------


async def test_a_row_released_just_over_the_retention_ago_is_purged(
    store: InMemoryStore, clock: FakeClock
) -> None:
    over = await released_ago(store, clock, 7 * DAY + 1)
    under = await released_ago(store, clock, 7 * DAY - 1)

    run = await purge.purge_gates(Settings(), store, clock)

    assert (run.deleted, run.batches, run.dry_run) == (1, 1, False)
    assert run.before == clock.now() - timedelta(days=7)
    assert over not in store.slots
    assert under in store.slots


async def test_a_held_row_is_never_purged_whatever_its_age(
    store: InMemoryStore, clock: FakeClock
) -> None:
    held = await store.open_slot("global", "dispatch:1", INSTANCE, clock.now())
    for years in (1, 10, 100):
        clock.advance(years * 365 * DAY)
        run = await purge.purge_gates(settings(purge={"gate_retention": "0"}), store, clock)
        assert run.deleted == 0
    assert [row.id for row in await store.held_slots()] == [held]


async def test_purge_runs_in_batches_until_nothing_old_is_left(
    store: InMemoryStore, clock: FakeClock
) -> None:
    for _ in range(12):
        await released_ago(store, clock, 8 * DAY)
    young = await released_ago(store, clock, DAY)

    run = await purge.purge_gates(settings(purge={"batch_size": 5}), store, clock)

    assert (run.deleted, run.batches) == (12, 3)
    assert list(store.slots) == [young]


async def test_a_purge_with_exactly_full_batches_counts_only_batches_that_deleted(
    store: InMemoryStore, clock: FakeClock
) -> None:
    for _ in range(10):
        await released_ago(store, clock, 8 * DAY)
    run = await purge.purge_gates(settings(purge={"batch_size": 5}), store, clock)
    assert (run.deleted, run.batches) == (10, 2)


async def test_dry_run_counts_and_deletes_nothing(store: InMemoryStore, clock: FakeClock) -> None:
    for _ in range(3):
        await released_ago(store, clock, 8 * DAY)
    await released_ago(store, clock, DAY)

    run = await purge.purge_gates(Settings(), store, clock, dry_run=True)

    assert (run.deleted, run.batches, run.dry_run) == (3, 0, True)
    assert len(store.slots) == 4


# -- retention -------------------------------------------------------------------------------


async def test_retention_boundary(store: InMemoryStore, clock: FakeClock) -> None:
    over = await finished_ago(store, clock, 30 * DAY + 1)
    under = await finished_ago(store, clock, 30 * DAY - 1)

    run = await purge.apply_retention(Settings(), store, clock)

    assert (run.dispatches, run.attempts, run.batches) == (1, 1, 1)
    assert set(store.dispatches) == {under}
    assert {a.dispatch_id for a in store.attempts.values()} == {under}
    assert over not in store.dispatches


async def test_retention_zero_keeps_dispatches_forever(
    store: InMemoryStore, clock: FakeClock
) -> None:
    kept = await finished_ago(store, clock, 10_000 * DAY)

    forever = settings(retention={"dispatches": "0"})
    run = await purge.apply_retention(forever, store, clock)
    dry = await purge.apply_retention(forever, store, clock, dry_run=True)

    assert (run.before, run.dispatches) == (None, 0)
    assert (dry.before, dry.dispatches) == (None, 0)
    assert set(store.dispatches) == {kept}


async def test_retention_never_deletes_queued_or_running_dispatches(
    store: InMemoryStore, clock: FakeClock
) -> None:
    old = clock.now() - timedelta(days=365)
    queued = (await store.check_and_reserve(NewDispatch(task="t", params={}), old)).id
    running = (await store.check_and_reserve(NewDispatch(task="t", params={}), old)).id
    await store.claim_next(INSTANCE, old, ())  # takes `queued` (oldest first)
    await store.claim_next(INSTANCE, old, ())

    run = await purge.apply_retention(Settings(), store, clock)

    assert run.dispatches == 0
    assert set(store.dispatches) == {queued, running}


async def test_idempotency_keys_of_retained_dispatches_keep_working(
    store: InMemoryStore, clock: FakeClock
) -> None:
    expired = await finished_ago(store, clock, 31 * DAY, key="old")
    retained = await finished_ago(store, clock, 29 * DAY, key="new")

    await purge.apply_retention(Settings(), store, clock)

    again = await store.check_and_reserve(
        NewDispatch(task="t", params={"key": "new"}, key="new"), clock.now()
    )
    assert (again.id, again.created) == (retained, False)
    reused = await store.check_and_reserve(
        NewDispatch(task="t", params={"key": "old"}, key="old"), clock.now()
    )
    assert reused.created and reused.id != expired


async def test_retention_dry_run(store: InMemoryStore, clock: FakeClock) -> None:
    await finished_ago(store, clock, 31 * DAY)
    run = await purge.apply_retention(Settings(), store, clock, dry_run=True)
    assert (run.dispatches, run.attempts, run.dry_run) == (1, 1, True)
    assert len(store.dispatches) == 1


# -- service.purge (the CLI's answer) --------------------------------------------------------------


async def test_purge_answers_both_jobs(store: InMemoryStore, clock: FakeClock) -> None:
    await released_ago(store, clock, 8 * DAY)
    await finished_ago(store, clock, 31 * DAY)

    dry = (await service.purge(Settings(), store, clock, dry_run=True)).to_json()
    assert dry == {
        "dry_run": True,
        "gates": {"before": "2025-12-25T00:00:00Z", "purgeable": 1},
        "dispatches": {"before": "2025-12-02T00:00:00Z", "expired": 1, "attempts": 1},
    }

    done = (await service.purge(Settings(), store, clock)).to_json()
    assert done["dry_run"] is False
    assert {k: done["gates"][k] for k in ("deleted", "batches")} == {"deleted": 1, "batches": 1}
    assert (done["dispatches"]["deleted"], done["dispatches"]["attempts_deleted"]) == (1, 1)
    assert store.slots == {} and store.dispatches == {} and store.attempts == {}
