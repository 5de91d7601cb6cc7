"""Execute: a plan's steps run as their needs allow, each in a branch of its own.

Steps whose needs have all succeeded start at once (each still takes its runner's
place); the dispatch keeps its one `global` place meanwhile. When a step ends:

- succeeded: its result is kept for the steps that use it, and the steps that were
  waiting only for it start;
- failed for good: nothing new starts, and the dispatch fails once the steps running
  beside it have ended, or at once when the step says `on_failure = "cancel_siblings"`
  (they are cancelled);
- to be retried later: the steps after it wait, the others go on; once nothing more
  can run the dispatch goes back to the queue, due when the retry is.

The pipeline runs each step (`RunStep`); this module only decides what runs when.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

import anyio
from anyio.abc import TaskGroup

from dispatcher.graph import Node, resolve_needs
from dispatcher.graph import ready as ready_steps
from dispatcher.models import DispatchStatus, Step


class Verdict(Enum):
    SUCCEEDED = "succeeded"
    RETRY_LATER = "retry_later"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StepEnd:
    """How one step's turn ended."""

    verdict: Verdict
    result: str | None = None
    """Its result (JSON text) when it succeeded."""
    retry_at: datetime | None = None
    """When it may run again (`RETRY_LATER`)."""
    reason: str | None = None
    """Why the dispatch fails (`FAILED`)."""


@dataclass(frozen=True, slots=True)
class GraphEnd:
    """How the plan's run ended: `succeeded`, `failed` (why), or `queued` (retry when)."""

    status: DispatchStatus
    reason: str | None = None
    not_before: datetime | None = None


@dataclass(eq=False)
class Branch:
    """One step started and not yet ended: running, or waiting for its runner's place."""

    step: str
    index: int
    scope: anyio.CancelScope | None = None
    """Cancels it, while steps run beside it (a step run alone has no sibling to
    cancel it)."""
    attempt: int | None = None
    """The number of its attempt once the attempt started."""
    waiting_for: str | None = None
    """The gate whose place it waits for (`runner:NAME`), if any."""
    cancelled_by: str | None = None
    """The step whose failure cancelled it (`on_failure = "cancel_siblings"`)."""


RunStep = Callable[[Step, Branch, Mapping[str, str | None]], Awaitable[StepEnd]]
"""Run one step in its branch, given the results of the steps done; never raises but
for cancellation (and defects)."""

OnDone = Callable[[Mapping[str, str | None]], Awaitable[None]]
"""Told after each step that succeeded, with every step done so far."""


class GraphRun:
    """One run of the steps of a plan that are not done yet; see the module docstring.

    `done`: steps that succeeded before (name -> result), never run again. `branches`
    shows the steps started and not yet ended, by name (the daemon's view of them).
    """

    def __init__(
        self,
        plan: Sequence[Step],
        done: Mapping[str, str | None],
        branches: MutableMapping[str, Branch],
        run_step: RunStep,
        on_done: OnDone,
    ) -> None:
        self._plan = {step.name: (index, step) for index, step in enumerate(plan)}
        self._needs = resolve_needs([Node(step.name, step.needs) for step in plan])
        self._done = dict(done)
        self._branches = branches
        self._run_step = run_step
        self._on_done = on_done
        self._started: set[str] = set()
        self._failure: str | None = None
        self._retry_at: datetime | None = None

    async def run(self) -> GraphEnd:
        """Run until nothing more can start and every started step has ended."""
        ready = self._ready()
        while len(ready) == 1:  # one step at a time (a chain): run it here, no task group
            if not await self._run_one(self._start(ready[0])):
                return self._end()
            ready = self._ready()
        if ready:
            try:
                async with anyio.create_task_group() as tg:
                    self._start_ready(tg)
            except ExceptionGroup as group:  # a defect in a branch: raise it as itself
                raise _first(group) from group
        return self._end()

    def _ready(self) -> list[str]:
        if self._failure is not None:
            return []
        return ready_steps(self._needs, self._done, self._started)

    def _start(self, name: str) -> Branch:
        branch = Branch(name, self._plan[name][0])
        self._started.add(name)
        self._branches[name] = branch
        return branch

    def _start_ready(self, tg: TaskGroup) -> None:
        for name in self._ready():
            branch = self._start(name)
            branch.scope = anyio.CancelScope()
            tg.start_soon(self._branch, tg, branch, name=f"step {name}")

    async def _branch(self, tg: TaskGroup, branch: Branch) -> None:
        if await self._run_one(branch):
            self._start_ready(tg)

    async def _run_one(self, branch: Branch) -> bool:
        """Run one started step to its end; True if it succeeded (more may start)."""
        step = self._plan[branch.step][1]
        end: StepEnd | None = None
        try:
            if branch.scope is None:
                end = await self._run_step(step, branch, self._done)
            else:
                with branch.scope:
                    end = await self._run_step(step, branch, self._done)
        finally:
            del self._branches[branch.step]
        if end is None:  # cancelled because a sibling failed: its attempt says so
            return False
        if end.verdict is Verdict.SUCCEEDED:
            self._done[step.name] = end.result
            await self._on_done(self._done)
            return True
        if end.verdict is Verdict.RETRY_LATER:
            assert end.retry_at is not None
            self._retry_at = max(self._retry_at or end.retry_at, end.retry_at)
        else:
            self._failed(step, end.reason or f"step {step.name!r} failed")
        return False

    def _failed(self, step: Step, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        if step.on_failure == "cancel_siblings":
            for branch in self._branches.values():
                if branch.scope is not None:
                    branch.cancelled_by = branch.cancelled_by or step.name
                    branch.scope.cancel()

    def _end(self) -> GraphEnd:
        if self._failure is not None:
            return GraphEnd(DispatchStatus.FAILED, self._failure)
        if self._retry_at is not None:
            return GraphEnd(DispatchStatus.QUEUED, not_before=self._retry_at)
        left = [name for name in self._plan if name not in self._done]
        if left:  # a stored plan that cannot finish: say so rather than loop
            return GraphEnd(DispatchStatus.FAILED, f"steps {', '.join(left)} could never start")
        return GraphEnd(DispatchStatus.SUCCEEDED)


def _first(group: BaseExceptionGroup[Exception]) -> Exception:
    """The first exception inside a (nested) group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first
