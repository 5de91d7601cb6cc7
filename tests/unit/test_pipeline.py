"""Plan -> Execute on the in-memory store with a fake clock and scripted runners."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import anyio
import pytest
import structlog

from dispatcher.models import (
    RESOURCE_SHORTAGE,
    SHUTDOWN_INTERRUPTION,
    AttemptStatus,
    DispatchStatus,
)
from dispatcher.pipeline import CancelReason, InFlight
from dispatcher.planners import steps_plan
from dispatcher.runners.base import Outcome
from dispatcher.testing import InMemoryStore
from tests.helpers.pipeline import Harness

from .fakes import CrashingRunner, ScriptedRunner, failed, ok


async def test_steps_run_in_order_with_params_and_one_attempt_each() -> None:
    work = ScriptedRunner("work")
    h = Harness({"work": work})
    dispatch_id = await h.submit("three", x="hello")
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    assert [call.step for call in work.calls] == ["a", "b", "c"]
    assert work.calls[0].args == ("hello",)
    assert h.attempts(dispatch_id) == [
        ("a", 1, AttemptStatus.SUCCEEDED),
        ("b", 1, AttemptStatus.SUCCEEDED),
        ("c", 1, AttemptStatus.SUCCEEDED),
    ]
    final = await h.store.get_dispatch(dispatch_id)
    assert final is not None and final.status is DispatchStatus.SUCCEEDED
    assert [row.released_at is not None for row in h.store.slots.values()] == [True] * 3


async def test_failed_step_is_retried_later_with_backoff_then_fails_for_good() -> None:
    # a succeeds, b fails three times (retries = 2)
    work = ScriptedRunner("work", [ok(), failed(3), failed(3), failed(4)])
    h = Harness({"work": work})
    dispatch_id = await h.submit("three", x="1")
    assert await h.run_next() is DispatchStatus.QUEUED
    queued = await h.store.get_dispatch(dispatch_id)
    assert queued is not None and queued.not_before is not None
    delay = (queued.not_before - h.clock.now()).total_seconds()
    assert 5.0 <= delay <= 10.0  # first retry: base 10s, half fixed, half jitter
    assert await h.store.claim_next("inst", h.clock.now(), set()) is None  # not yet due
    h.clock.advance(10)
    assert await h.run_next() is DispatchStatus.QUEUED
    h.clock.advance(20)
    assert await h.run_next() is DispatchStatus.FAILED
    assert [c.step for c in work.calls] == ["a", "b", "b", "b"]  # a never ran again
    final = await h.store.get_dispatch(dispatch_id)
    assert final is not None
    assert final.error == "step 'b' failed after 3 attempts: exited with status 4"
    assert [n for _, n, _ in h.attempts(dispatch_id)] == [1, 1, 2, 3]


async def test_failures_are_logged_as_warnings_and_a_failed_dispatch_as_an_error() -> None:
    work = ScriptedRunner("work", [ok(), failed(3), failed(3), failed(4)])
    h = Harness({"work": work})
    await h.submit("three", x="1")
    with structlog.testing.capture_logs() as events:
        for _ in range(3):
            await h.run_next()
            h.clock.advance(60)
    levels = [
        (e["event"], e.get("status"), e["log_level"])
        for e in events
        if e["event"] in ("attempt_finished", "dispatch_finished")
    ]
    assert levels == [
        ("attempt_finished", AttemptStatus.SUCCEEDED, "info"),
        ("attempt_finished", AttemptStatus.FAILED, "warning"),
        ("attempt_finished", AttemptStatus.FAILED, "warning"),
        ("attempt_finished", AttemptStatus.FAILED, "warning"),
        ("dispatch_finished", DispatchStatus.FAILED, "error"),
    ]


async def test_resume_skips_succeeded_steps() -> None:
    work = ScriptedRunner("work")
    h = Harness({"work": work})
    dispatch_id = await h.submit("three", x="1")
    await h.claim()
    plan = steps_plan(h.settings.tasks["three"], {"x": "1"})
    await h.store.save_plan(dispatch_id, plan, h.clock.now())
    await h.store.advance(dispatch_id, 2, h.clock.now())  # a and b succeeded earlier
    await h.store.requeue(dispatch_id, h.clock.now())
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    assert [c.step for c in work.calls] == ["c"]


async def test_crash_interruptions_are_bounded_but_shutdowns_are_not() -> None:
    work = ScriptedRunner("work")
    h = Harness({"work": work})
    dispatch_id = await h.submit("three", x="1")
    await h.claim()
    plan = steps_plan(h.settings.tasks["three"], {"x": "1"})
    await h.store.save_plan(dispatch_id, plan, h.clock.now())
    await h.store.requeue(dispatch_id, h.clock.now())
    for _ in range(5):  # graceful shutdowns: never a reason to give up
        await h.claim()
        attempt = await h.store.start_attempt(dispatch_id, 0, "a", "work", 1, "x", h.clock.now())
        h.store.finish_attempt(
            attempt, AttemptStatus.INTERRUPTED, h.clock.now(), error=SHUTDOWN_INTERRUPTION
        )
        await h.store.requeue(dispatch_id, h.clock.now())
    for _ in range(3):  # the daemon died under this step three times
        await h.claim()
        await h.store.start_attempt(dispatch_id, 0, "a", "work", 1, "x", h.clock.now())
        await h.store.recover("y", h.clock.now())
    assert await h.run_next() is DispatchStatus.FAILED
    final = await h.store.get_dispatch(dispatch_id)
    assert final is not None and "interrupted 3 times" in (final.error or "")
    assert work.calls == []


@pytest.mark.parametrize(
    ("reason", "dispatch_status", "attempt_status"),
    [
        (CancelReason.USER, DispatchStatus.CANCELLED, AttemptStatus.CANCELLED),
        (CancelReason.SHUTDOWN, DispatchStatus.QUEUED, AttemptStatus.INTERRUPTED),
    ],
)
async def test_cancel_stops_the_step_and_records_why(
    reason: CancelReason, dispatch_status: DispatchStatus, attempt_status: AttemptStatus
) -> None:
    """A user's cancel ends the dispatch; a shutdown re-queues it to resume later."""
    work = ScriptedRunner("work", gate=asyncio.Event())
    h = Harness({"work": work})
    dispatch_id = await h.submit("three", x="1")
    dispatch = await h.claim()
    flight = InFlight(dispatch.id)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.pipeline.run, dispatch, flight)
        await work.started.wait()
        flight.cancel(reason)
    final = await h.store.get_dispatch(dispatch_id)
    assert final is not None and final.status is dispatch_status
    assert h.attempts(dispatch_id) == [("a", 1, attempt_status)]
    assert all(row.released_at is not None for row in h.store.slots.values())


async def test_after_a_shutdown_the_step_resumes_as_its_next_attempt() -> None:
    work = ScriptedRunner("work", gate=asyncio.Event())
    h = Harness({"work": work})
    dispatch_id = await h.submit("three", x="1")
    dispatch = await h.claim()
    flight = InFlight(dispatch.id)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.pipeline.run, dispatch, flight)
        await work.started.wait()
        flight.cancel(CancelReason.SHUTDOWN)
    work.gate = None
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    assert h.attempts(dispatch_id)[1] == ("a", 2, AttemptStatus.SUCCEEDED)


async def test_runner_exception_becomes_a_failed_attempt() -> None:
    h = Harness({"crash": CrashingRunner()})
    dispatch_id = await h.submit("crashy")
    assert await h.run_next() is DispatchStatus.FAILED
    attempt = next(iter(h.store.attempts.values()))
    assert attempt.status is AttemptStatus.FAILED
    assert attempt.error == "runner error: RuntimeError: boom"
    assert dispatch_id == attempt.dispatch_id


async def test_runner_cap_holds_across_dispatches() -> None:
    work = ScriptedRunner("work")
    h = Harness({"work": work})
    for n in range(6):
        await h.submit("three", x=str(n))
    async with anyio.create_task_group() as tg:
        for _ in range(6):
            dispatch = await h.claim()
            tg.start_soon(h.pipeline.run, dispatch, InFlight(dispatch.id))
    assert work.peak == 1
    assert len(work.calls) == 18


async def test_python_planner_runs_as_an_attempt() -> None:
    work = ScriptedRunner("work")
    h = Harness({"work": work})
    dispatch_id = await h.submit("planned", n=2)
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    assert [c.args for c in work.calls] == [("0",), ("1",)]
    assert h.attempts(dispatch_id)[0] == ("(plan)", 1, AttemptStatus.SUCCEEDED)


async def test_invalid_plan_fails_the_dispatch_with_the_reason() -> None:
    h = Harness({"work": ScriptedRunner("work")})
    dispatch_id = await h.submit("badplan")
    assert await h.run_next() is DispatchStatus.FAILED
    final = await h.store.get_dispatch(dispatch_id)
    assert final is not None
    assert final.error == (
        "planner failed: invalid plan: plan.steps[0].runner: unknown runner 'gpu' "
        "(known: crash, py, work)"
    )
    assert h.attempts(dispatch_id) == [("(plan)", 1, AttemptStatus.FAILED)]


@pytest.mark.parametrize("advance", [0, 1])
async def test_not_before_is_respected_by_claim(advance: int) -> None:
    h = Harness({"work": ScriptedRunner("work")})
    dispatch_id = await h.submit("three", x="1")
    d = await h.claim()
    await h.store.requeue(d.id, h.clock.now(), h.clock.now() + timedelta(seconds=1))
    h.clock.advance(advance)
    claimed = await h.store.claim_next("inst", h.clock.now(), set())
    assert (claimed is not None) == bool(advance)
    assert dispatch_id == d.id


class JournalStore(InMemoryStore):
    """Notes attempt starts, and when they are durable, in one journal with the runner's
    own runs."""

    def __init__(self) -> None:
        super().__init__()
        self.journal: list[str] = []

    async def start_attempt(self, *args: Any, durable: bool = False, **kwargs: Any) -> int:
        self.journal.append("start_attempt")
        attempt_id = await super().start_attempt(*args, durable=durable, **kwargs)
        if durable:
            self.journal.append("durable")
        return attempt_id


@pytest.mark.parametrize("effects", [True, False])
async def test_a_step_with_effects_runs_only_after_its_attempt_start_is_durable(
    effects: bool,
) -> None:
    store = JournalStore()
    work = ScriptedRunner("work", effects=effects)
    original_run = work.run

    async def run(request: Any) -> Any:
        store.journal.append("run")
        return await original_run(request)

    work.run = run  # type: ignore[method-assign]
    h = Harness({"work": work}, store=store)
    await h.submit("three", x="1")

    assert await h.run_next() is DispatchStatus.SUCCEEDED
    expected = ["start_attempt", "durable", "run"] if effects else ["start_attempt", "run"]
    assert store.journal == expected * 3


def short_of(resource: str = "Too many open files") -> Outcome:
    """What the exec runner answers when its process cannot be started (EMFILE...)."""
    return Outcome(
        AttemptStatus.INTERRUPTED,
        error=f"{RESOURCE_SHORTAGE}: cannot execute 'x': {resource}",
    )


async def test_a_step_that_cannot_start_for_lack_of_a_resource_uses_up_no_retry() -> None:
    """Step b allows 2 retries; 5 resource shortages, then 2 failures, then success."""
    work = ScriptedRunner("work", [ok(), *[short_of()] * 5, failed(3), failed(3), ok(), ok()])
    h = Harness({"work": work})
    dispatch_id = await h.submit("three", x="1")
    delays = []
    for _ in range(7):
        assert await h.run_next() is DispatchStatus.QUEUED
        queued = await h.store.get_dispatch(dispatch_id)
        assert queued is not None and queued.not_before is not None
        delays.append((queued.not_before - h.clock.now()).total_seconds())
        h.clock.advance(120)
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    statuses = [status for step, _, status in h.attempts(dispatch_id) if step == "b"]
    assert statuses == [AttemptStatus.INTERRUPTED] * 5 + [AttemptStatus.FAILED] * 2 + [
        AttemptStatus.SUCCEEDED
    ]
    # the shortages back off on their own: 1 s, 2 s, 4 s ... (half fixed, half jitter)
    for ceiling, delay in zip([1, 2, 4, 8, 16], delays[:5], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert 5 <= delays[5] <= 10  # then the step's own backoff (10 s) for its failures


async def test_resource_shortages_are_not_crash_interruptions() -> None:
    """max_interruptions (3) counts daemon crashes only: 5 shortages do not fail it."""
    work = ScriptedRunner("work", [*[short_of("Cannot allocate memory")] * 5])
    h = Harness({"work": work})
    dispatch_id = await h.submit("three", x="1")
    for _ in range(5):
        assert await h.run_next() is DispatchStatus.QUEUED
        h.clock.advance(120)
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    assert [c.step for c in work.calls] == ["a"] * 6 + ["b", "c"]
    assert [n for step, n, _ in h.attempts(dispatch_id) if step == "a"] == [1, 2, 3, 4, 5, 6]
