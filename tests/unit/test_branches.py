"""Parallel branches, results and step context on the in-memory store with a fake clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from dispatcher.models import AttemptStatus, DispatchStatus
from dispatcher.pipeline import CancelReason, InFlight
from dispatcher.planners import steps_plan
from dispatcher.runners.base import Outcome, RunRequest
from tests.helpers.pipeline import Harness

from .fakes import failed

CI_STEPS: list[dict[str, Any]] = [
    {"name": "build", "runner": "free", "args": ["build", "{version}"]},
    {"name": "test", "runner": "free", "needs": ["build"]},
    {"name": "lint", "runner": "free", "needs": ["build"], "retries": 1, "backoff": "10s"},
    {
        "name": "deploy",
        "runner": "free",
        "needs": ["test", "lint"],
        "args": ["deploy", "{steps.build.result.artifact}", "{version}"],
    },
]

CONFIG: dict[str, Any] = {
    "runners": {
        "free": {"type": "exec"},
        "one": {"type": "exec", "concurrency": 1},
        "py": {"type": "python"},
    },
    "tasks": {
        "ci": {"steps": CI_STEPS},
        "ci_cancel": {
            "steps": [
                CI_STEPS[0],
                CI_STEPS[1],
                {**CI_STEPS[2], "retries": 0, "on_failure": "cancel_siblings"},
                CI_STEPS[3],
            ]
        },
        "capped": {
            "steps": [
                {"name": "a", "runner": "one", "needs": []},
                {"name": "b", "runner": "one", "needs": []},
                {"name": "c", "runner": "free", "needs": []},
                {"name": "d", "runner": "free", "needs": []},
            ]
        },
        "pyresult": {
            "steps": [
                {"name": "make", "runner": "free"},
                {
                    "name": "use",
                    "runner": "py",
                    "call": "m:f",
                    "kwargs": {
                        "path": "{steps.make.result.artifact}",
                        "all": "{steps.make.result}",
                    },
                },
            ]
        },
        "planned": {"planner": "python", "call": "tests.unit.planners:graph_plan"},
    },
}


@dataclass
class BranchRunner:
    """A fake runner: each step may wait for its own event and answer scripted outcomes;
    it notes starts, ends and the most steps it ran at once."""

    name: str
    effects: bool = True
    holds: dict[str, asyncio.Event] = field(default_factory=dict)
    script: dict[str, list[Outcome]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    journal: list[str] = field(default_factory=list)
    calls: list[RunRequest] = field(default_factory=list)
    running: int = 0
    peak: int = 0

    def hold(self, *steps: str) -> None:
        for step in steps:
            self.holds[step] = asyncio.Event()

    def release(self, step: str) -> None:
        self.holds.pop(step).set()

    async def run(self, request: RunRequest) -> Outcome:
        self.calls.append(request)
        self.journal.append(f"start {request.step}")
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            hold = self.holds.get(request.step)
            await (hold.wait() if hold is not None else asyncio.sleep(0))
        except asyncio.CancelledError:
            self.journal.append(f"cancelled {request.step}")
            raise
        finally:
            self.running -= 1
        self.journal.append(f"end {request.step}")
        scripted = self.script.get(request.step)
        if scripted:
            return scripted.pop(0)
        result = self.results.get(request.step)
        encoded = None if result is None else json.dumps(result)
        return Outcome(AttemptStatus.SUCCEEDED, exit_code=0, result=encoded)

    def started(self, step: str) -> bool:
        return f"start {step}" in self.journal


def harness(**runners: BranchRunner) -> Harness:
    return Harness(runners, config=CONFIG)


def attempts(h: Harness, dispatch_id: int) -> list[tuple[str, int, AttemptStatus, str | None]]:
    """(step, attempt number, status, error) of each attempt, oldest first."""
    return [(a.step, a.attempt, a.status, a.error) for a in h.attempt_rows(dispatch_id)]


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` holds (a fake clock never moves by itself).
    Turns of the loop first; then short real sleeps, for work handed to a thread (a
    python planner), bounded by a wall-clock deadline for a loaded machine."""
    deadline = time.monotonic() + 10
    turns = 0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        turns += 1
        await asyncio.sleep(0 if turns < 1000 else 0.001)


async def in_background(
    h: Harness, body: Callable[[InFlight], Awaitable[None]]
) -> tuple[int, DispatchStatus]:
    """Run the next dispatch while `body` drives it; answer its id and final status."""
    dispatch = await h.claim()
    flight = InFlight(dispatch.id)
    answer: list[DispatchStatus] = []

    async def run() -> None:
        answer.append(await h.pipeline.run(dispatch, flight))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await body(flight)
    return dispatch.id, answer[0]


# -- ordering ---------------------------------------------------------------------------------


async def test_branches_whose_need_succeeded_run_at_once_and_the_join_waits_for_both() -> None:
    free = BranchRunner("free", results={"build": {"artifact": "/out/app-1.tar"}})
    free.hold("test", "lint")
    h = harness(free=free)
    await h.submit("ci", version="1")

    async def drive(flight: InFlight) -> None:
        await until(lambda: free.running == 2)
        assert [b.step for b in flight.running()] == ["test", "lint"]
        free.release("lint")
        await until(lambda: free.journal[-1] == "end lint")
        assert not free.started("deploy")  # test still runs
        free.release("test")

    dispatch_id, status = await in_background(h, drive)
    assert status is DispatchStatus.SUCCEEDED
    assert free.journal == [
        "start build",
        "end build",
        "start test",
        "start lint",
        "end lint",
        "end test",
        "start deploy",
        "end deploy",
    ]
    assert free.peak == 2
    assert (await h.dispatch(dispatch_id)).current_step == 4


async def test_a_result_fills_a_later_steps_args_when_it_starts() -> None:
    free = BranchRunner("free", results={"build": {"artifact": "/out/app {1}.tar"}})
    h = harness(free=free)
    dispatch_id = await h.submit("ci", version="{v}")
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    deploy = next(call for call in free.calls if call.step == "deploy")
    assert deploy.args == ("deploy", "/out/app {1}.tar", "{v}")
    build = next(a for a in h.store.attempts.values() if a.step == "build")
    assert json.loads(build.result or "") == {"artifact": "/out/app {1}.tar"}
    assert (await h.dispatch(dispatch_id)).plan is not None


async def test_results_fill_python_kwargs_as_text() -> None:
    free = BranchRunner("free", results={"make": {"artifact": "/a.tar", "n": 2}})
    py = BranchRunner("py")
    h = harness(free=free, py=py)
    await h.submit("pyresult")
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    assert py.calls[0].kwargs == {"path": "/a.tar", "all": '{"artifact":"/a.tar","n":2}'}


async def test_a_missing_result_field_fails_the_step_before_it_starts_with_one_line() -> None:
    free = BranchRunner("free", results={"build": {"dir": "/out"}})
    h = harness(free=free)
    dispatch_id = await h.submit("ci", version="1")
    assert await h.run_next() is DispatchStatus.FAILED
    assert (await h.dispatch(dispatch_id)).error == (
        "step 'deploy': {steps.build.result.artifact}: the result of step 'build' "
        "has no 'artifact' (it has: dir)"
    )
    assert not free.started("deploy")
    assert [step for step, *_ in attempts(h, dispatch_id)] == ["build", "test", "lint"]


# -- failures ---------------------------------------------------------------------------------


async def test_a_failed_branch_fails_the_dispatch_once_its_running_sibling_ends() -> None:
    free = BranchRunner("free", script={"test": [failed(2)]})
    free.hold("lint")
    h = harness(free=free)
    await h.submit("ci", version="1")

    async def drive(flight: InFlight) -> None:
        await until(lambda: free.journal[-1:] == ["end test"])
        await until(lambda: [b.step for b in flight.running()] == ["lint"])
        assert (await h.dispatch(flight.dispatch_id)).status is DispatchStatus.RUNNING
        free.release("lint")

    dispatch_id, status = await in_background(h, drive)
    assert status is DispatchStatus.FAILED
    assert (await h.dispatch(dispatch_id)).error == (
        "step 'test' failed after 1 attempt: exited with status 2"
    )
    assert attempts(h, dispatch_id) == [
        ("build", 1, AttemptStatus.SUCCEEDED, None),
        ("test", 1, AttemptStatus.FAILED, "exited with status 2"),
        ("lint", 1, AttemptStatus.SUCCEEDED, None),
    ]
    assert not free.started("deploy")


async def test_cancel_siblings_stops_the_running_siblings_at_once() -> None:
    free = BranchRunner("free", script={"lint": [failed(1)]})
    free.hold("test")  # never released: only the cancel ends it
    h = harness(free=free)
    await h.submit("ci_cancel", version="1")
    assert await h.run_next() is DispatchStatus.FAILED
    assert "cancelled test" in free.journal
    dispatch_id = 1
    assert attempts(h, dispatch_id) == [
        ("build", 1, AttemptStatus.SUCCEEDED, None),
        ("test", 1, AttemptStatus.CANCELLED, "cancelled: step 'lint' failed"),
        ("lint", 1, AttemptStatus.FAILED, "exited with status 1"),
    ]
    final = await h.dispatch(dispatch_id)
    assert final.error == "step 'lint' failed after 1 attempt: exited with status 1"


async def test_a_retry_in_one_branch_lets_the_other_finish_then_only_it_runs_again() -> None:
    free = BranchRunner("free", script={"lint": [failed(1)]}, results={"build": {"artifact": "x"}})
    free.hold("test")
    h = harness(free=free)
    await h.submit("ci", version="1")

    async def drive(flight: InFlight) -> None:
        await until(lambda: "end lint" in free.journal)
        await asyncio.sleep(0)
        assert [b.step for b in flight.running()] == ["test"]
        free.release("test")

    dispatch_id, status = await in_background(h, drive)
    assert status is DispatchStatus.QUEUED
    queued = await h.dispatch(dispatch_id)
    assert queued.not_before is not None and queued.not_before > h.clock.now()
    h.clock.advance(10)
    free.journal.clear()
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    assert free.journal == ["start lint", "end lint", "start deploy", "end deploy"]
    assert [(step, n) for step, n, *_ in attempts(h, dispatch_id)] == [
        ("build", 1),
        ("test", 1),
        ("lint", 1),
        ("lint", 2),
        ("deploy", 1),
    ]


# -- caps, cancels and restarts ----------------------------------------------------------------


async def test_a_runner_cap_holds_inside_branches_while_other_runners_run_beside() -> None:
    one = BranchRunner("one")
    free = BranchRunner("free")
    one.hold("a", "b")
    free.hold("c", "d")
    h = harness(one=one, free=free)
    await h.submit("capped")

    async def drive(flight: InFlight) -> None:
        await until(lambda: one.running == 1 and free.running == 2)
        waiting = {b.step: b.waiting_for for b in flight.running()}
        assert waiting == {"a": None, "b": "runner:one", "c": None, "d": None}
        one.release("a")
        free.release("c")
        free.release("d")
        await until(lambda: one.started("b"))
        one.release("b")

    _, status = await in_background(h, drive)
    assert status is DispatchStatus.SUCCEEDED
    assert (one.peak, free.peak) == (1, 2)


@pytest.mark.parametrize(
    ("reason", "dispatch_status", "attempt_status"),
    [
        (CancelReason.USER, DispatchStatus.CANCELLED, AttemptStatus.CANCELLED),
        (CancelReason.SHUTDOWN, DispatchStatus.QUEUED, AttemptStatus.INTERRUPTED),
    ],
)
async def test_a_cancel_or_shutdown_stops_every_branch(
    reason: CancelReason, dispatch_status: DispatchStatus, attempt_status: AttemptStatus
) -> None:
    free = BranchRunner("free")
    free.hold("test", "lint")
    h = harness(free=free)
    await h.submit("ci", version="1")

    async def drive(flight: InFlight) -> None:
        await until(lambda: free.running == 2)
        flight.cancel(reason)

    dispatch_id, status = await in_background(h, drive)
    assert status is dispatch_status
    statuses = [(step, status) for step, _, status, _ in attempts(h, dispatch_id)]
    assert statuses == [
        ("build", AttemptStatus.SUCCEEDED),
        ("test", attempt_status),
        ("lint", attempt_status),
    ]


async def test_after_a_crash_only_unfinished_branches_run_and_results_survive() -> None:
    free = BranchRunner("free")
    h = harness(free=free)
    dispatch_id = await h.submit("ci", version="1")
    await h.claim()
    plan = steps_plan(h.settings.tasks["ci"], {"version": "1"})
    await h.store.save_plan(dispatch_id, plan, h.clock.now())
    now = h.clock.now()
    for index, step, result in [(0, "build", '{"artifact":"/b.tar"}'), (1, "test", None)]:
        attempt = await h.store.start_attempt(dispatch_id, index, step, "free", 1, "dead", now)
        h.store.finish_attempt(attempt, AttemptStatus.SUCCEEDED, now, result=result)
    await h.store.start_attempt(dispatch_id, 2, "lint", "free", 1, "dead", now)
    await h.store.recover("next", now)  # the daemon died with lint running
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    assert free.journal == ["start lint", "end lint", "start deploy", "end deploy"]
    assert free.calls[0].attempt == 2
    assert free.calls[1].args == ("deploy", "/b.tar", "1")


# -- context ------------------------------------------------------------------------------------


async def test_every_step_gets_its_context_and_a_token_stable_across_retries() -> None:
    free = BranchRunner("free", script={"lint": [failed(1)]}, results={"build": {"artifact": 1}})
    h = harness(free=free)
    dispatch_id = await h.submit("ci", key="release-1", version="1")
    assert await h.run_next() is DispatchStatus.QUEUED
    h.clock.advance(10)
    assert await h.run_next() is DispatchStatus.SUCCEEDED
    contexts = [call.context for call in free.calls]
    assert all(c is not None and c.dispatch_id == dispatch_id for c in contexts)
    lint = [c for c in contexts if c is not None and c.step == "lint"]
    assert [c.attempt for c in lint] == [1, 2]
    assert lint[0].step_token == lint[1].step_token
    assert (lint[0].task, lint[0].key) == ("ci", "release-1")
    tokens = {c.step: c.step_token for c in contexts if c is not None}
    assert len(set(tokens.values())) == 4
    other = await h.submit("ci", version="1")
    assert (await h.dispatch(other)).step_token("lint") != lint[0].step_token


async def test_a_planner_plan_runs_as_a_graph_too() -> None:
    free = BranchRunner("free", results={"fetch": "v9"})
    free.hold("left", "right")
    h = harness(free=free)
    await h.submit("planned")

    async def drive(flight: InFlight) -> None:
        await until(lambda: free.running == 2)
        free.release("left")
        free.release("right")

    _, status = await in_background(h, drive)
    assert status is DispatchStatus.SUCCEEDED
    join = free.calls[-1]
    assert (join.step, join.args) == ("join", ("v9",))
