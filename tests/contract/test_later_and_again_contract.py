"""Delayed dispatches, retry, key reuse and schedule fires: the same on every backend."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dispatcher.errors import NotFound, NotRetryable
from dispatcher.models import (
    AttemptStatus,
    DispatchStatus,
    FireOutcome,
    NewDispatch,
    Step,
)
from dispatcher.store.base import Store
from dispatcher.testing import FakeClock

from .conftest import Reserve

ME = "instance-a"
PLAN = (Step(name="one", runner="r"), Step(name="two", runner="r"), Step(name="three", runner="r"))


async def fail_at_step_two(store: Store, clock: FakeClock, dispatch_id: int) -> None:
    """Claim, plan, run step one, fail step two: as the pipeline writes it."""
    claimed = await store.claim_many(ME, clock.now(), (), 1)
    assert [d.id for d in claimed] == [dispatch_id]
    await store.save_plan(dispatch_id, PLAN, clock.now())
    one = await store.start_attempt(dispatch_id, 0, "one", "r", 1, ME, clock.now())
    store.finish_attempt(one, AttemptStatus.SUCCEEDED, clock.now(), result='"r1"')
    await store.advance(dispatch_id, 1, clock.now())
    two = await store.start_attempt(dispatch_id, 1, "two", "r", 1, ME, clock.now())
    store.finish_attempt(two, AttemptStatus.FAILED, clock.now(), error="boom")
    store.finish_dispatch(dispatch_id, DispatchStatus.FAILED, clock.now(), "two failed")
    await store.flush()


# -- delayed ---------------------------------------------------------------------------------


async def test_a_dispatch_is_not_claimed_before_its_time_and_next_due_says_when(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    later = clock.now() + timedelta(seconds=30)
    answer = await reserve(not_before=later)
    assert answer.not_before == later
    assert (await store.get_dispatch(answer.id)).not_before == later  # type: ignore[union-attr]
    assert await store.next_due(clock.now()) == later
    assert await store.claim_many(ME, clock.now(), (), 5) == []
    clock.advance(30)
    assert await store.next_due(clock.now()) is None  # due now: nothing waits any more
    assert [d.id for d in await store.claim_many(ME, clock.now(), (), 5)] == [answer.id]


# -- retry -----------------------------------------------------------------------------------


async def test_retry_queues_a_failed_dispatch_again_keeping_its_plan_steps_and_claims(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    answer = await reserve(key="k")
    await fail_at_step_two(store, clock, answer.id)
    clock.advance(5)
    retried = await store.retry(answer.id, clock.now())
    assert retried.status is DispatchStatus.QUEUED
    assert (retried.series, retried.claims, retried.current_step) == (1, 1, 1)
    assert retried.plan == PLAN
    assert (retried.error, retried.finished_at, retried.not_before) == (None, None, None)
    again = await store.claim_many(ME, clock.now(), (), 1)
    assert again[0].claims == 2 and again[0].resumed  # it reads its history
    attempt = await store.start_attempt(answer.id, 1, "two", "r", 2, ME, clock.now(), 1)
    store.finish_attempt(attempt, AttemptStatus.SUCCEEDED, clock.now())
    history = await store.list_attempts(answer.id)
    assert [(a.step, a.attempt, a.series) for a in history] == [
        ("one", 1, 0),
        ("two", 1, 0),
        ("two", 2, 1),
    ]


async def test_retry_refuses_what_is_not_failed_or_cancelled(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    answer = await reserve()
    with pytest.raises(NotRetryable, match="is queued"):
        await store.retry(answer.id, clock.now())
    with pytest.raises(NotFound):
        await store.retry(answer.id + 1000, clock.now())


async def test_a_cancelled_dispatch_can_be_retried(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    answer = await reserve()
    await store.request_cancel(answer.id, clock.now())
    retried = await store.retry(answer.id, clock.now())
    assert (retried.status, retried.series, retried.cancel_requested) == ("queued", 1, False)


async def test_key_reuse_after_failure_starts_the_failed_dispatch_again(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    first = await reserve(key="nightly", params={"day": 1})
    await fail_at_step_two(store, clock, first.id)
    plain = await reserve(key="nightly", params={"day": 1})
    assert (plain.id, plain.status, plain.created, plain.retried) == (
        first.id,
        "failed",
        False,
        False,
    )
    again = await reserve(key="nightly", params={"day": 1}, retry_failed=True)
    assert (again.id, again.status, again.created, again.retried) == (
        first.id,
        "queued",
        False,
        True,
    )
    twice = await reserve(key="nightly", params={"day": 1}, retry_failed=True)
    assert (twice.status, twice.retried) == ("queued", False)  # queued: answered as it is


# -- schedule fires ----------------------------------------------------------------------------


def fire(name: str, at_s: int, clock: FakeClock) -> tuple[NewDispatch, object]:
    at = clock.now().replace(microsecond=0) + timedelta(seconds=at_s)
    return NewDispatch(task="tick", params={}, key=f"schedule:{name}:{at.isoformat()}"), at


async def test_a_fire_is_dispatched_once_and_never_again_nor_an_earlier_one(
    store: Store, clock: FakeClock
) -> None:
    new, at = fire("s", 2, clock)
    first = await store.fire_schedule("s", at, new, "allow", clock.now())  # type: ignore[arg-type]
    again = await store.fire_schedule("s", at, new, "allow", clock.now())  # type: ignore[arg-type]
    older_new, older_at = fire("s", 0, clock)
    older = await store.fire_schedule("s", older_at, older_new, "allow", clock.now())  # type: ignore[arg-type]
    assert first.outcome is FireOutcome.DISPATCHED and first.dispatch_id is not None
    assert (again.outcome, older.outcome) == (FireOutcome.SEEN, FireOutcome.SEEN)
    assert len(await store.list_dispatches()) == 1
    state = (await store.schedule_states())["s"]
    assert (state.last_fire, state.last_outcome, state.last_dispatch_id) == (
        at,
        "dispatched",
        first.dispatch_id,
    )
    assert state.last_status is DispatchStatus.QUEUED


async def test_overlap_skip_and_queue_against_the_previous_unfinished_dispatch(
    store: Store, clock: FakeClock
) -> None:
    ids = []
    for n, overlap in enumerate(("skip", "skip", "queue")):
        new, at = fire("s", 2 * (n + 1), clock)
        fired = await store.fire_schedule("s", at, new, overlap, clock.now())  # type: ignore[arg-type]
        ids.append((fired.outcome, fired.dispatch_id))
    first = ids[0][1]
    assert ids[1] == (FireOutcome.SKIPPED, first)
    assert ids[2][0] is FireOutcome.DISPATCHED
    queued = await store.get_dispatch(ids[2][1])  # type: ignore[arg-type]
    assert queued is not None and queued.follows == first
    assert [d.id for d in await store.claim_many(ME, clock.now(), (), 5)] == [first]
    assert await store.claim_many(ME, clock.now(), (), 5) == []  # waits for the first
    store.finish_dispatch(first, DispatchStatus.SUCCEEDED, clock.now())  # type: ignore[arg-type]
    await store.flush()  # a claim goes ahead of queued writes
    assert [d.id for d in await store.claim_many(ME, clock.now(), (), 5)] == [ids[2][1]]
