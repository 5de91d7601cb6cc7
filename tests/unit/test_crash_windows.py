"""Crash windows between two writes of the pipeline (found by scripts/chaos)."""

from __future__ import annotations

from dispatcher.models import AttemptStatus, DispatchStatus
from dispatcher.planners import steps_plan
from tests.helpers.pipeline import Harness

from .fakes import ScriptedRunner


async def test_a_step_whose_success_was_recorded_is_not_rerun_after_a_crash() -> None:
    """The daemon died after the step's attempt was stamped succeeded, before `advance`."""
    work = ScriptedRunner("work")
    h = Harness({"work": work})
    dispatch_id = await h.submit("three", x="1")
    claimed = await h.claim()
    now = h.clock.now()
    await h.store.save_plan(dispatch_id, steps_plan(h.settings.tasks["three"], claimed.params), now)
    attempt = await h.store.start_attempt(dispatch_id, 0, "a", "work", 1, "dead", now)
    h.store.finish_attempt(attempt, AttemptStatus.SUCCEEDED, now, exit_code=0)
    report = await h.store.recover("next", now)  # what the next daemon does at start
    assert report.dispatches_requeued == 1

    assert await h.run_next() is DispatchStatus.SUCCEEDED

    assert [call.step for call in work.calls] == ["b", "c"]  # a did not run again
    assert h.attempts(dispatch_id) == [
        ("a", 1, AttemptStatus.SUCCEEDED),
        ("b", 1, AttemptStatus.SUCCEEDED),
        ("c", 1, AttemptStatus.SUCCEEDED),
    ]
