"""The behaviour every `Store` backend must share (SQLite, in-memory, PostgreSQL: `store`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from dispatcher.errors import KeyConflict, LeaseLost, NotFound
from dispatcher.models import (
    AttemptStatus,
    DispatchStatus,
    GateRowCounts,
    Instance,
    NewDispatch,
    Reservation,
    Step,
)
from dispatcher.store.base import Store
from dispatcher.testing import FakeClock

from .conftest import Reserve, all_slot_rows

OLD = "instance-old"
NEW = "instance-new"

PLAN = (
    Step(name="fetch", runner="shell", args=("curl", "x"), timeout=30.0, retries=2),
    Step(name="build", runner="py", call="pkg.mod:fn", kwargs={"n": 1}),
)


async def claim(store: Store, clock: FakeClock, blocked: tuple[str, ...] = ()) -> int | None:
    dispatch = await store.claim_next(OLD, clock.now(), blocked)
    return None if dispatch is None else dispatch.id


async def claim_all(store: Store, clock: FakeClock, blocked: tuple[str, ...] = ()) -> list[int]:
    claimed: list[int] = []
    while (dispatch_id := await claim(store, clock, blocked)) is not None:
        claimed.append(dispatch_id)
    return claimed


# -- reserving ---------------------------------------------------------------------------------


async def test_reserve_creates_a_queued_dispatch_and_nothing_else(
    store: Store, clock: FakeClock
) -> None:
    new = NewDispatch(task="build", params={"ref": "main", "n": 2}, key="k1", priority=3)
    answer = await store.check_and_reserve(new, clock.now())

    assert answer.created and answer.status is DispatchStatus.QUEUED
    dispatch = await store.get_dispatch(answer.id)
    assert dispatch is not None
    assert (dispatch.task, dispatch.params, dispatch.key) == (
        "build",
        {"ref": "main", "n": 2},
        "k1",
    )
    assert (dispatch.priority, dispatch.fingerprint) == (3, new.fingerprint)
    assert dispatch.status is DispatchStatus.QUEUED
    assert (dispatch.plan, dispatch.current_step, dispatch.cancel_requested) == (None, 0, False)
    assert dispatch.created_at == dispatch.updated_at == clock.now()
    assert dispatch.started_at is None and dispatch.finished_at is None
    assert await store.list_attempts(answer.id) == []
    assert await store.held_slots() == []
    assert await store.gate_row_counts() == GateRowCounts(held=0, released=0)


async def test_reserve_without_a_key_always_creates(reserve: Reserve) -> None:
    first, second = await reserve(), await reserve()
    assert first.created and second.created
    assert first.id != second.id


async def test_same_key_and_params_answers_the_existing_dispatch(
    store: Store, reserve: Reserve
) -> None:
    first = await reserve(params={"a": 1, "b": 2}, key="k")
    again = await reserve(params={"b": 2, "a": 1}, key="k")

    assert again == Reservation(id=first.id, status=DispatchStatus.QUEUED, created=False)
    assert len(await store.list_dispatches()) == 1


@pytest.mark.parametrize(
    ("task", "params"), [("build", {"a": 2}), ("deploy", {"a": 1}), ("build", {})]
)
async def test_same_key_with_other_task_or_params_conflicts(
    store: Store, reserve: Reserve, task: str, params: dict[str, int]
) -> None:
    first = await reserve(task="build", params={"a": 1}, key="k")

    with pytest.raises(KeyConflict) as caught:
        await reserve(task=task, params=params, key="k")

    assert (caught.value.key, caught.value.existing_id) == ("k", first.id)
    assert len(await store.list_dispatches()) == 1


async def test_a_known_key_reports_the_current_status(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    first = await reserve(key="k")
    await claim(store, clock)

    again = await reserve(key="k")

    assert again == Reservation(id=first.id, status=DispatchStatus.PLANNING, created=False)


async def test_reserve_many_answers_each_item_in_place(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    known = await reserve(params={"x": 1}, key="known")
    news = [
        NewDispatch(task="build", params={"x": 2}, key="fresh"),
        NewDispatch(task="build", params={"x": 1}, key="known"),
        NewDispatch(task="build", params={"x": 9}, key="known"),
        NewDispatch(task="build", params={"x": 2}, key="fresh"),
        NewDispatch(task="build", params={"x": 3}, key="fresh"),
        NewDispatch(task="build", params={"x": 4}),
    ]

    answers = await store.reserve_many(news, clock.now())

    fresh, existing, conflict, repeat, conflict_in_batch, keyless = answers
    assert isinstance(fresh, Reservation) and fresh.created
    assert existing == Reservation(id=known.id, status=DispatchStatus.QUEUED, created=False)
    assert isinstance(conflict, KeyConflict) and conflict.existing_id == known.id
    assert repeat == Reservation(id=fresh.id, status=DispatchStatus.QUEUED, created=False)
    assert isinstance(conflict_in_batch, KeyConflict)
    assert conflict_in_batch.existing_id == fresh.id
    assert isinstance(keyless, Reservation) and keyless.created
    assert len(await store.list_dispatches()) == 3
    assert await store.gate_row_counts() == GateRowCounts(held=0, released=0)


async def test_reserve_many_of_nothing(store: Store, clock: FakeClock) -> None:
    assert await store.reserve_many([], clock.now()) == []


# -- claiming --------------------------------------------------------------------------------


async def test_claim_takes_highest_priority_then_oldest(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    low_old = await reserve(priority=0)
    clock.advance(1)
    high_new = await reserve(priority=5)
    clock.advance(1)
    low_new = await reserve(priority=0)
    high_newer = await reserve(priority=5)
    negative = await reserve(priority=-1)

    assert await claim_all(store, clock) == [
        high_new.id,
        high_newer.id,
        low_old.id,
        low_new.id,
        negative.id,
    ]


async def test_claim_with_nothing_queued(store: Store, clock: FakeClock) -> None:
    assert await store.claim_next(OLD, clock.now(), ()) is None


async def test_a_fresh_claim_is_planning_and_stamped(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    answer = await reserve()
    clock.advance(5)

    dispatch = await store.claim_next(OLD, clock.now(), ())

    assert dispatch is not None and dispatch.id == answer.id
    assert dispatch.status is DispatchStatus.PLANNING
    assert dispatch.instance_id == OLD
    assert dispatch.started_at == dispatch.updated_at == clock.now()
    assert dispatch == await store.get_dispatch(answer.id)
    assert await store.claim_next(OLD, clock.now(), ()) is None


async def test_claim_skips_dispatches_not_yet_due(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    later = await reserve(priority=9)
    await claim(store, clock)
    await store.requeue(later.id, clock.now(), not_before=clock.now() + timedelta(seconds=30))
    ready = await reserve(priority=0)

    assert await claim_all(store, clock) == [ready.id]
    clock.advance(29.999)
    assert await claim(store, clock) is None
    clock.advance(0.001)
    assert await claim(store, clock) == later.id


async def test_claim_skips_blocked_gates(store: Store, clock: FakeClock, reserve: Reserve) -> None:
    a1 = await reserve(priority=9, gate_key="task:a")
    b1 = await reserve(priority=5, gate_key="task:b")
    free = await reserve(priority=1)
    a2 = await reserve(priority=0, gate_key="task:a")

    assert await claim_all(store, clock, blocked=("task:a", "task:c")) == [b1.id, free.id]
    assert await claim(store, clock, blocked=("task:a",)) is None
    assert await claim_all(store, clock) == [a1.id, a2.id]


async def test_a_planned_dispatch_resumes_running_where_it_stopped(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    answer = await reserve()
    first = await store.claim_next(OLD, clock.now(), ())
    assert first is not None
    clock.advance(1)
    await store.save_plan(answer.id, PLAN, clock.now())
    await store.advance(answer.id, 1, clock.now())
    await store.requeue(answer.id, clock.now())
    requeued = await store.get_dispatch(answer.id)
    assert requeued is not None
    assert (requeued.status, requeued.instance_id) == (DispatchStatus.QUEUED, None)
    clock.advance(1)

    resumed = await store.claim_next(NEW, clock.now(), ())

    assert resumed is not None and resumed.id == answer.id
    assert resumed.status is DispatchStatus.RUNNING
    assert (resumed.plan, resumed.current_step, resumed.instance_id) == (PLAN, 1, NEW)
    assert resumed.started_at == first.started_at


async def test_save_plan_starts_running_at_step_zero(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    answer = await reserve()
    await claim(store, clock)

    await store.save_plan(answer.id, PLAN, clock.now())

    dispatch = await store.get_dispatch(answer.id)
    assert dispatch is not None
    assert (dispatch.status, dispatch.plan, dispatch.current_step) == (
        DispatchStatus.RUNNING,
        PLAN,
        0,
    )


async def test_finish_dispatch_is_final(store: Store, clock: FakeClock, reserve: Reserve) -> None:
    answer = await reserve()
    await claim(store, clock)
    clock.advance(2)

    store.finish_dispatch(answer.id, DispatchStatus.FAILED, clock.now(), error="boom")
    store.finish_dispatch(answer.id, DispatchStatus.SUCCEEDED, clock.now() + timedelta(1))
    await store.requeue(answer.id, clock.now())

    dispatch = await store.get_dispatch(answer.id)
    assert dispatch is not None
    assert (dispatch.status, dispatch.error) == (DispatchStatus.FAILED, "boom")
    assert dispatch.finished_at == clock.now()
    with pytest.raises(ValueError, match="final status"):
        store.finish_dispatch(answer.id, DispatchStatus.RUNNING, clock.now())


# -- attempts --------------------------------------------------------------------------------


async def test_attempt_lifecycle(store: Store, clock: FakeClock, reserve: Reserve) -> None:
    dispatch_id = (await reserve()).id
    first = await store.start_attempt(dispatch_id, 0, "fetch", "shell", 1, OLD, clock.now())
    start = clock.now()
    clock.advance(3)
    store.finish_attempt(first, AttemptStatus.FAILED, clock.now(), exit_code=2, error="x")
    second = await store.start_attempt(dispatch_id, 0, "fetch", "shell", 2, OLD, clock.now())
    other = await store.start_attempt(dispatch_id, 1, "build", "py", 1, OLD, clock.now())
    store.finish_attempt(second, AttemptStatus.SUCCEEDED, clock.now(), output="ok")

    attempts = await store.step_attempts(dispatch_id, 0)
    assert [(a.id, a.attempt, a.status) for a in attempts] == [
        (first, 1, AttemptStatus.FAILED),
        (second, 2, AttemptStatus.SUCCEEDED),
    ]
    failed = attempts[0]
    assert (failed.step, failed.runner, failed.instance_id) == ("fetch", "shell", OLD)
    assert (failed.started_at, failed.ended_at) == (start, clock.now())
    assert (failed.exit_code, failed.error, failed.output) == (2, "x", None)
    assert attempts[1].output == "ok"
    running = (await store.step_attempts(dispatch_id, 1))[0]
    assert (running.status, running.ended_at) == (AttemptStatus.RUNNING, None)
    assert [a.id for a in await store.list_attempts(dispatch_id)] == [first, second, other]


async def test_a_result_is_kept_with_its_attempt_exactly_as_given(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    dispatch_id = (await reserve()).id
    text = '{"path":"/tmp/app-1.2.tar","sizes":[1,2.5],"note":"héllo ✓","ok":true}'
    first = await store.start_attempt(dispatch_id, 0, "build", "shell", 1, OLD, clock.now())
    await store.flush()  # its row is written: the end is a separate update
    store.finish_attempt(first, AttemptStatus.SUCCEEDED, clock.now(), result=text)
    folded = await store.start_attempt(dispatch_id, 1, "pack", "shell", 1, OLD, clock.now())
    store.finish_attempt(folded, AttemptStatus.SUCCEEDED, clock.now(), result='"x"')
    plain = await store.start_attempt(dispatch_id, 2, "test", "shell", 1, OLD, clock.now())
    store.finish_attempt(plain, AttemptStatus.SUCCEEDED, clock.now())

    results = [a.result for a in await store.list_attempts(dispatch_id)]

    assert results == [text, '"x"', None]


async def test_only_a_running_attempt_is_finished(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    dispatch_id = (await reserve()).id
    attempt_id = await store.start_attempt(dispatch_id, 0, "s", "r", 1, OLD, clock.now())
    store.finish_attempt(attempt_id, AttemptStatus.SUCCEEDED, clock.now(), exit_code=0)
    clock.advance(1)

    store.finish_attempt(attempt_id, AttemptStatus.FAILED, clock.now(), exit_code=1)

    (attempt,) = await store.list_attempts(dispatch_id)
    assert (attempt.status, attempt.exit_code) == (AttemptStatus.SUCCEEDED, 0)
    with pytest.raises(ValueError, match="final status"):
        store.finish_attempt(attempt_id, AttemptStatus.RUNNING, clock.now())


# -- gate mirror -----------------------------------------------------------------------------


async def test_close_slot_releases_exactly_once(store: Store, clock: FakeClock) -> None:
    slot = await store.open_slot("global", "dispatch:1", OLD, clock.now())
    clock.advance(1)
    released_at = clock.now()

    assert await store.close_slot(slot, released_at) is True
    clock.advance(1)
    assert await store.close_slot(slot, clock.now()) is False
    assert await store.close_slot(slot + 1000, clock.now()) is False
    assert await store.gate_row_counts() == GateRowCounts(held=0, released=1)


async def test_held_slots_and_row_counts(store: Store, clock: FakeClock) -> None:
    acquired = clock.now()
    first = await store.open_slot("global", "dispatch:1", OLD, acquired)
    second = await store.open_slot("runner:shell", "dispatch:1", OLD, acquired)
    third = await store.open_slot("global", "dispatch:2", OLD, acquired)
    await store.close_slot(second, clock.now())

    held = await store.held_slots()

    assert [slot.id for slot in held] == [first, third]
    assert (held[0].gate, held[0].holder, held[0].instance_id) == ("global", "dispatch:1", OLD)
    assert (held[0].acquired_at, held[0].released_at, held[0].recovered) == (acquired, None, False)
    assert await store.gate_row_counts() == GateRowCounts(held=2, released=1)


# -- recovery --------------------------------------------------------------------------------


async def test_recover_undoes_what_a_dead_instance_left(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    planning, running, done, waiting = [(await reserve(params={"n": n})).id for n in range(4)]
    await claim(store, clock)
    await claim(store, clock)
    await store.save_plan(running, PLAN, clock.now())
    await claim(store, clock)
    store.finish_dispatch(done, DispatchStatus.SUCCEEDED, clock.now())
    ok = await store.start_attempt(running, 0, "fetch", "shell", 1, OLD, clock.now())
    store.finish_attempt(ok, AttemptStatus.SUCCEEDED, clock.now())
    open_attempt = await store.start_attempt(running, 1, "build", "py", 1, OLD, clock.now())
    held = [await store.open_slot("global", f"dispatch:{i}", OLD, clock.now()) for i in (1, 2)]
    closed = await store.open_slot("global", "dispatch:3", OLD, clock.now())
    await store.close_slot(closed, clock.now())
    clock.advance(60)

    report = await store.recover(NEW, clock.now())

    assert (report.slots_released, report.attempts_interrupted, report.dispatches_requeued) == (
        2,
        1,
        2,
    )
    assert await store.held_slots() == []
    assert await store.gate_row_counts() == GateRowCounts(held=0, released=3)
    assert await store.close_slot(held[0], clock.now()) is False
    attempts = {a.id: a for a in await store.list_attempts(running)}
    assert attempts[ok].status is AttemptStatus.SUCCEEDED
    assert (attempts[open_attempt].status, attempts[open_attempt].ended_at) == (
        AttemptStatus.INTERRUPTED,
        clock.now(),
    )
    for dispatch_id in (planning, running):
        dispatch = await store.get_dispatch(dispatch_id)
        assert dispatch is not None
        assert (dispatch.status, dispatch.instance_id) == (DispatchStatus.QUEUED, None)
    assert await store.get_dispatch(done) is not None
    assert (await store.count_by_status())[DispatchStatus.SUCCEEDED] == 1
    assert await claim_all(store, clock) == [planning, running, waiting]


async def test_recover_marks_released_rows_as_recovered(store: Store, clock: FakeClock) -> None:
    stale = await store.open_slot("global", "dispatch:1", OLD, clock.now())
    given_back = await store.open_slot("global", "dispatch:2", OLD, clock.now())
    await store.close_slot(given_back, clock.now())
    clock.advance(1)

    await store.recover(NEW, clock.now())

    rows = {row.id: row for row in await all_slot_rows(store)}
    assert (rows[stale].released_at, rows[stale].recovered) == (clock.now(), True)
    assert rows[given_back].recovered is False
    assert rows[given_back].released_at == clock.now() - timedelta(seconds=1)


async def test_recover_leaves_the_calling_instance_alone(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    mine = (await reserve()).id
    await store.claim_next(NEW, clock.now(), ())
    slot = await store.open_slot("global", f"dispatch:{mine}", NEW, clock.now())
    attempt_id = await store.start_attempt(mine, 0, "s", "r", 1, NEW, clock.now())

    report = await store.recover(NEW, clock.now())

    assert (report.slots_released, report.attempts_interrupted, report.dispatches_requeued) == (
        0,
        0,
        0,
    )
    assert [s.id for s in await store.held_slots()] == [slot]
    assert (await store.list_attempts(mine))[0].id == attempt_id
    assert (await store.list_attempts(mine))[0].status is AttemptStatus.RUNNING


async def test_requeue_abandoned_puts_back_only_this_instances_unkept_dispatches(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    ids = [(await reserve(params={"n": n})).id for n in range(5)]
    mine = await store.claim_many(NEW, clock.now(), (), 3)
    other = await store.claim_next(OLD, clock.now(), ())
    assert other is not None and [d.id for d in mine] == ids[:3]
    store.finish_dispatch(ids[2], DispatchStatus.SUCCEEDED, clock.now())  # queued write

    requeued = await store.requeue_abandoned(NEW, keep=[ids[0]], now=clock.now())

    assert requeued == [ids[1]]
    statuses = [(await store.get_dispatch(i)).status for i in ids]  # type: ignore[union-attr]
    assert statuses == [
        DispatchStatus.PLANNING,  # kept: in flight
        DispatchStatus.QUEUED,  # abandoned
        DispatchStatus.SUCCEEDED,  # finished before the check: stays final
        DispatchStatus.PLANNING,  # another instance's
        DispatchStatus.QUEUED,  # never claimed
    ]
    assert await store.requeue_abandoned(NEW, keep=[], now=clock.now()) == [ids[0]]


# -- cancelling ------------------------------------------------------------------------------


async def test_cancel_a_queued_dispatch_at_once(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    answer = await reserve()
    clock.advance(1)

    dispatch = await store.request_cancel(answer.id, clock.now())

    assert dispatch.status is DispatchStatus.CANCELLED
    assert (dispatch.finished_at, dispatch.error) == (clock.now(), "cancelled before it started")
    assert dispatch == await store.get_dispatch(answer.id)
    assert await claim(store, clock) is None


@pytest.mark.parametrize("planned", [False, True], ids=["planning", "running"])
async def test_cancel_an_in_flight_dispatch_flags_it(
    store: Store, clock: FakeClock, reserve: Reserve, planned: bool
) -> None:
    answer = await reserve()
    other = await reserve()
    await claim_all(store, clock)
    if planned:
        await store.save_plan(answer.id, PLAN, clock.now())
    expected = DispatchStatus.RUNNING if planned else DispatchStatus.PLANNING

    dispatch = await store.request_cancel(answer.id, clock.now())

    assert (dispatch.status, dispatch.cancel_requested) == (expected, True)
    assert dispatch.finished_at is None
    assert await store.cancel_requests([answer.id, other.id, 999]) == [answer.id]
    assert await store.cancel_requests([other.id]) == []
    assert await store.cancel_requests([]) == []


@pytest.mark.parametrize("final", [DispatchStatus.SUCCEEDED, DispatchStatus.FAILED])
async def test_cancel_a_finished_dispatch_changes_nothing(
    store: Store, clock: FakeClock, reserve: Reserve, final: DispatchStatus
) -> None:
    answer = await reserve()
    await claim(store, clock)
    store.finish_dispatch(answer.id, final, clock.now())
    before = await store.get_dispatch(answer.id)
    clock.advance(1)

    assert await store.request_cancel(answer.id, clock.now()) == before


async def test_cancel_twice_keeps_the_first_answer(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    answer = await reserve()
    first = await store.request_cancel(answer.id, clock.now())
    clock.advance(1)

    assert await store.request_cancel(answer.id, clock.now()) == first


async def test_cancel_an_unknown_dispatch(store: Store, clock: FakeClock) -> None:
    with pytest.raises(NotFound, match="42"):
        await store.request_cancel(42, clock.now())


# -- reading ---------------------------------------------------------------------------------


async def test_list_dispatches_newest_first_with_filter_and_limit(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    ids = [(await reserve()).id for _ in range(4)]
    await claim(store, clock)

    assert [d.id for d in await store.list_dispatches()] == ids[::-1]
    assert [d.id for d in await store.list_dispatches(limit=2)] == ids[:1:-1]
    queued = await store.list_dispatches(status=DispatchStatus.QUEUED)
    assert [d.id for d in queued] == ids[:0:-1]
    assert [d.id for d in await store.list_dispatches(DispatchStatus.PLANNING)] == [ids[0]]
    assert await store.list_dispatches(DispatchStatus.FAILED) == []


async def test_count_by_status_names_every_status(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    assert await store.count_by_status() == dict.fromkeys(DispatchStatus, 0)
    for _ in range(3):
        await reserve()
    await claim(store, clock)

    counts = await store.count_by_status()

    assert counts[DispatchStatus.QUEUED] == 2
    assert counts[DispatchStatus.PLANNING] == 1
    assert sum(counts.values()) == 3


async def test_unknown_dispatch_reads_as_none(store: Store) -> None:
    assert await store.get_dispatch(12345) is None
    assert await store.list_attempts(12345) == []


async def test_times_come_back_as_aware_utc(store: Store, reserve: Reserve) -> None:
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2026, 11, 29, 4, 35, 45, 123456, tzinfo=plus_two)
    answer = await store.check_and_reserve(NewDispatch(task="t", params={}), local)

    dispatch = await store.get_dispatch(answer.id)

    assert dispatch is not None
    assert dispatch.created_at == datetime(2026, 11, 29, 2, 35, 45, 123456, tzinfo=UTC)
    assert dispatch.created_at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="naive"):
        await store.check_and_reserve(NewDispatch(task="t", params={}), datetime(2026, 1, 1))


# -- instances -------------------------------------------------------------------------------


def instance(instance_id: str, at: datetime) -> Instance:
    return Instance(
        id=instance_id,
        hostname="host",
        pid=123,
        version="0.1.0",
        started_at=at,
        heartbeat_at=at,
        stopped_at=None,
    )


async def test_heartbeat_keeps_an_instance_live(store: Store, clock: FakeClock) -> None:
    await store.register_instance(instance(OLD, clock.now()))
    clock.advance(10)
    await store.register_instance(instance(NEW, clock.now()))
    clock.advance(10)
    await store.heartbeat(NEW, clock.now())
    ttl = timedelta(seconds=15)

    live = await store.live_instances(since=clock.now() - ttl)

    assert [i.id for i in live] == [NEW]
    assert live[0].heartbeat_at == clock.now()
    assert (live[0].hostname, live[0].pid, live[0].version) == ("host", 123, "0.1.0")
    assert [i.id for i in await store.live_instances(since=clock.now() - 2 * ttl)] == [OLD, NEW]
    assert [i.id for i in await store.live_instances(since=clock.now())] == [NEW]


async def test_a_stopped_instance_is_not_live_and_its_heartbeat_fails_loudly(
    store: Store, clock: FakeClock
) -> None:
    await store.register_instance(instance(OLD, clock.now()))
    await store.stop_instance(OLD, clock.now())

    with pytest.raises(LeaseLost, match="reaped"):
        await store.heartbeat(OLD, clock.now())  # never revives it

    assert await store.live_instances(since=clock.now() - timedelta(hours=1)) == []
