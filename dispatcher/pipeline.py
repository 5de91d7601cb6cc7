"""Plan -> Execute of one dispatch, while the dispatch loop holds its `global` slot.

The pipeline speaks in store verbs; it never sees SQL. Every outcome write is
shielded, so a cancelled step still records how it ended. What runs when (steps side
by side as their needs allow) is `dispatcher.branches`; running one step is here.

A step is done when it has a succeeded attempt: a resumed dispatch reads its attempts
once and runs only the steps not done, so a step that succeeded never runs again.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

import anyio

from dispatcher import limits, logs
from dispatcher.branches import Branch, GraphRun, StepEnd, Verdict
from dispatcher.child_output import ChildOutputLog
from dispatcher.clock import Clock
from dispatcher.config import Settings
from dispatcher.errors import DispatcherError, LeaseLost
from dispatcher.gate import ConcurrencyGate, runner_gate, step_holder
from dispatcher.models import (
    LEASE_INTERRUPTION,
    PLAN_STEP_INDEX,
    PLAN_STEP_NAME,
    PLANNER_RUNNER,
    SHUTDOWN_INTERRUPTION,
    Attempt,
    AttemptStatus,
    Dispatch,
    DispatchStatus,
    Step,
    is_resource_shortage,
)
from dispatcher.observe import NullObserver, Observer
from dispatcher.planners import PlanJob, planner_of
from dispatcher.retry import (
    SHORTAGE_BACKOFF,
    SHORTAGE_BACKOFF_MAX,
    StepHistory,
    backoff_delay,
    may_retry,
)
from dispatcher.runners.base import Outcome, Runner, RunRequest, StepContext
from dispatcher.store.base import Store
from dispatcher.templating import MissingResult, fill_results, map_strings

log = logs.get_logger("dispatcher.pipeline")

_FAILED_ATTEMPTS = frozenset({AttemptStatus.FAILED, AttemptStatus.TIMED_OUT})
"""Attempts logged at `warning` (a failed dispatch is logged at `error`)."""


class CancelReason(Enum):
    USER = "user"
    SHUTDOWN = "shutdown"
    LEASE = "lease"
    """This daemon's lease expired or was taken: another daemon may run the work."""


@dataclass(eq=False)
class InFlight:
    """A dispatch being worked on: its cancel scope, why it was cancelled, and the steps
    started and not yet ended (its branches; the planner while it plans)."""

    dispatch_id: int
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    reason: CancelReason | None = None
    branches: dict[str, Branch] = field(default_factory=dict)

    def cancel(self, reason: CancelReason) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()

    def running(self) -> list[Branch]:
        """Its branches in plan order (the planner first)."""
        return sorted(self.branches.values(), key=lambda branch: branch.index)

    @property
    def waiting_for(self) -> str | None:
        """The gate it waits for when every branch waits for a place (it runs nothing)."""
        gates = [branch.waiting_for for branch in self.running()]
        return gates[0] if gates and all(gates) else None


Work = Callable[[], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class AttemptSpec:
    """Which execution an attempt row stands for."""

    dispatch_id: int
    step_index: int
    step: str
    runner: str
    number: int
    effects: bool = True
    """Make the start durable before the work begins (see `Runner.effects`)."""
    series: int = 0
    """The dispatch's series (see `Store.retry`)."""


class Pipeline:
    """Runs one dispatch at a time per call; many calls run concurrently."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        gate: ConcurrencyGate,
        clock: Clock,
        runners: Mapping[str, Runner],
        instance_id: str,
        rand: random.Random | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self.runners = dict(runners)
        self._store = store
        self._gate = gate
        self._clock = clock
        self.instance_id = instance_id
        """This instance (it changes when a daemon rejoins after a lost lease)."""
        self._rand = rand or random.Random()
        self.observer: Observer = observer or NullObserver()

    async def run(self, dispatch: Dispatch, flight: InFlight) -> DispatchStatus:
        """Plan (if needed) and execute the remaining steps; answer the status left."""
        with logs.bound(dispatch_id=dispatch.id, task=dispatch.task):
            log.debug("dispatch_started", step_index=dispatch.current_step, status=dispatch.status)
            try:
                with flight.scope:
                    return await self._plan_and_execute(dispatch, flight)
                return await self._after_cancel(dispatch, flight)
            except LeaseLost:
                # Another daemon took this daemon's work: nothing of it may be written or
                # run from here (the daemon ends its other dispatches too, and rejoins).
                log.warning("dispatch_abandoned", reason="lease")
                return DispatchStatus.QUEUED
            except Exception as exc:  # a defect or a dead database: fail loudly, don't lose it
                log.exception("dispatch_crashed")
                reason = f"internal error: {type(exc).__name__}: {exc}"
                return await self._finish(dispatch, DispatchStatus.FAILED, reason)

    # -- plan ---------------------------------------------------------------------------

    async def _plan_and_execute(self, dispatch: Dispatch, flight: InFlight) -> DispatchStatus:
        task = self.settings.tasks.get(dispatch.task)
        if task is None:
            reason = f"task {dispatch.task!r} is no longer in the configuration"
            return await self._finish(dispatch, DispatchStatus.FAILED, reason)
        plan = dispatch.plan
        if plan is None:
            planned = await self._make_plan(dispatch, flight)
            if planned is None:
                return DispatchStatus.QUEUED  # deferred: a resource was lacking
            if isinstance(planned, str):
                return await self._finish(dispatch, DispatchStatus.FAILED, planned)
            plan = planned
            await self._store.save_plan(dispatch.id, plan, self._clock.now())
            log.debug("dispatch_planned", steps=len(plan))
        return await self._execute(dispatch, plan, flight)

    async def _make_plan(
        self, dispatch: Dispatch, flight: InFlight
    ) -> tuple[Step, ...] | str | None:
        """The plan, a one-line reason why there is none, or None when the planner
        could not start for lack of a resource (the dispatch is queued again)."""
        task = self.settings.tasks[dispatch.task]
        planner = planner_of(task)
        if not planner.external:
            planned = await planner.plan(PlanJob(dispatch, task, self.settings))
            if planned.steps is None:
                return f"planner failed: {planned.outcome.error}"
            return planned.steps
        history = StepHistory.of([])
        if dispatch.resumed:
            earlier = await self._store.step_attempts(dispatch.id, PLAN_STEP_INDEX)
            history = StepHistory.of(earlier, dispatch.series)
        if history.interruptions >= self.settings.daemon.max_interruptions:
            return f"planner was interrupted {history.interruptions} times; giving up"
        spec = AttemptSpec(
            dispatch.id,
            PLAN_STEP_INDEX,
            PLAN_STEP_NAME,
            PLANNER_RUNNER,
            history.next_attempt,
            series=dispatch.series,
        )  # a planner (a process or user code) has effects
        plans: list[tuple[Step, ...]] = []
        branch = flight.branches[PLAN_STEP_NAME] = Branch(PLAN_STEP_NAME, PLAN_STEP_INDEX)
        try:
            work = functools.partial(self._run_planner, dispatch, plans)
            outcome = await self._attempt(spec, flight, branch, work)
        finally:
            del flight.branches[PLAN_STEP_NAME]
        if is_resource_shortage(outcome.status, outcome.error):
            retry_at = self._deferred(history.shortages + 1, outcome)
            await self._store.requeue(dispatch.id, self._clock.now(), retry_at)
            return None
        if not outcome.ok:
            return f"planner failed: {outcome.error}"
        return plans[0]

    async def _run_planner(self, dispatch: Dispatch, plans: list[tuple[Step, ...]]) -> Outcome:
        """Run the task's planner; on success the validated plan is appended to `plans`."""
        task = self.settings.tasks[dispatch.task]
        lines = self._line_logger(PLAN_STEP_NAME)
        try:
            job = PlanJob(dispatch, task, self.settings, on_line=lines)
            planned = await planner_of(task).plan(job)
        finally:
            lines.close()
        if planned.steps is not None:
            plans.append(planned.steps)
        return planned.outcome

    # -- execute ---------------------------------------------------------------------------

    async def _execute(
        self, dispatch: Dispatch, plan: tuple[Step, ...], flight: InFlight
    ) -> DispatchStatus:
        attempts = await self._step_attempts(dispatch)
        done = self._done_steps(dispatch, plan, attempts)
        reached = dispatch.current_step

        async def advance(now_done: Mapping[str, str | None]) -> None:
            # `current_step`: every step before it has succeeded (what `show` marks).
            nonlocal reached
            first = next((i for i, s in enumerate(plan) if s.name not in now_done), len(plan))
            if first > reached:
                reached = first
                await self._store.advance(dispatch.id, first, self._clock.now())

        async def run_step(step: Step, branch: Branch, results: Results) -> StepEnd:
            history = StepHistory.of(attempts.get(branch.index, []), dispatch.series)
            with logs.bound(step=step.name, runner=step.runner):
                return await self._run_branch(dispatch, flight, branch, step, history, results)

        end = await GraphRun(plan, done, flight.branches, run_step, advance).run()
        if end.status is DispatchStatus.QUEUED:
            await self._store.requeue(dispatch.id, self._clock.now(), end.not_before)
            return DispatchStatus.QUEUED
        return await self._finish(dispatch, end.status, end.reason)

    async def _step_attempts(self, dispatch: Dispatch) -> dict[int, list[Attempt]]:
        """Earlier attempts of each step, oldest first. A dispatch claimed for the first
        time has none; neither has one whose plan is made in this run."""
        if not dispatch.resumed or dispatch.plan is None:
            return {}
        found: dict[int, list[Attempt]] = {}
        for attempt in await self._store.list_attempts(dispatch.id):
            found.setdefault(attempt.step_index, []).append(attempt)
        return found

    @staticmethod
    def _done_steps(
        dispatch: Dispatch, plan: Sequence[Step], attempts: Mapping[int, list[Attempt]]
    ) -> dict[str, str | None]:
        """Steps that succeeded before, with their results: never run again."""
        done: dict[str, str | None] = {}
        for index, step in enumerate(plan):
            succeeded = [a for a in attempts.get(index, []) if a.status is AttemptStatus.SUCCEEDED]
            if succeeded or index < dispatch.current_step:
                done[step.name] = succeeded[-1].result if succeeded else None
            if succeeded and index >= dispatch.current_step:
                # Its success is recorded, but the daemon died before `advance`.
                log.info("step_already_succeeded", step=step.name, step_index=index)
        return done

    async def _run_branch(
        self,
        dispatch: Dispatch,
        flight: InFlight,
        branch: Branch,
        step: Step,
        history: StepHistory,
        results: Results,
    ) -> StepEnd:
        """One step in its branch: checks, its args filled, one attempt, the verdict."""
        refused = self._refusal(step, history)
        if refused is not None:
            return StepEnd(Verdict.FAILED, reason=refused)
        try:
            args, kwargs = _filled(step, results)
        except MissingResult as exc:
            log.warning("step_result_missing", error=str(exc))
            return StepEnd(Verdict.FAILED, reason=f"step {step.name!r}: {exc}")
        runner = self.runners[step.runner]
        number = history.next_attempt
        lines = self._line_logger(step.name)
        request = RunRequest(
            dispatch_id=dispatch.id,
            step=step.name,
            attempt=number,
            args=args,
            timeout=step.timeout,
            call=step.call,
            kwargs=kwargs,
            on_line=lines,
            context=_context(dispatch, step.name, number),
        )
        spec = AttemptSpec(
            dispatch.id,
            branch.index,
            step.name,
            step.runner,
            number,
            runner.effects,
            dispatch.series,
        )
        try:
            outcome = await self._attempt(spec, flight, branch, lambda: runner.run(request))
        finally:
            lines.close()
        if outcome.ok:
            return StepEnd(Verdict.SUCCEEDED, result=outcome.result)
        if is_resource_shortage(outcome.status, outcome.error):
            retry_at = self._deferred(history.shortages + 1, outcome)
            return StepEnd(Verdict.RETRY_LATER, retry_at=retry_at)
        return self._after_failure(step, history.failures + 1, outcome)

    def _refusal(self, step: Step, history: StepHistory) -> str | None:
        """Why a step may not start at all (then the dispatch fails), if it may not."""
        if history.interruptions >= self.settings.daemon.max_interruptions:
            return f"step {step.name!r} was interrupted {history.interruptions} times; giving up"
        if step.runner not in self.runners:
            return f"step {step.name!r}: runner {step.runner!r} is no longer configured"
        return None

    def _deferred(self, shortages: int, outcome: Outcome) -> datetime:
        """An infrastructure failure (a resource lacking to start a process): when to try
        again, after a backoff of its own; the step's retries stay unused."""
        delay = backoff_delay(shortages, SHORTAGE_BACKOFF, SHORTAGE_BACKOFF_MAX, self._rand)
        log.warning(
            "step_deferred",
            reason=outcome.error,
            shortages=shortages,
            delay_ms=round(delay * 1000),
        )
        return self._clock.now() + timedelta(seconds=delay)

    def _after_failure(self, step: Step, failures: int, outcome: Outcome) -> StepEnd:
        if may_retry(step, failures):
            delay = backoff_delay(failures, step.backoff, step.backoff_max, self._rand)
            retry_at = self._clock.now() + timedelta(seconds=delay)
            log.info("step_retry_scheduled", delay_ms=round(delay * 1000), failures=failures)
            return StepEnd(Verdict.RETRY_LATER, retry_at=retry_at)
        tries = f"{failures} attempt{'s' if failures > 1 else ''}"
        reason = f"step {step.name!r} failed after {tries}: {outcome.error}"
        return StepEnd(Verdict.FAILED, reason=reason)

    async def _attempt(
        self, spec: AttemptSpec, flight: InFlight, branch: Branch, work: Work
    ) -> Outcome:
        """One attempt: take the runner slot, record the row, run, record the end."""
        gate_name = runner_gate(spec.runner)
        if not self._gate.has(gate_name):
            return await self._record_attempt(spec, flight, branch, work)
        holder = step_holder(spec.dispatch_id, spec.step, spec.number)
        branch.waiting_for = gate_name
        try:
            async with self._gate.hold(gate_name, holder):
                branch.waiting_for = None
                return await self._record_attempt(spec, flight, branch, work)
        finally:
            branch.waiting_for = None

    async def _record_attempt(
        self, spec: AttemptSpec, flight: InFlight, branch: Branch, work: Work
    ) -> Outcome:
        started = self._clock.now()
        attempt_id = await self._store.start_attempt(
            spec.dispatch_id,
            spec.step_index,
            spec.step,
            spec.runner,
            spec.number,
            self.instance_id,
            started,
            spec.series,
            durable=spec.effects,
        )
        log.info("attempt_started", step=spec.step, runner=spec.runner, attempt=spec.number)
        branch.attempt = spec.number
        try:
            outcome = storable(await self._invoke(work))
        except anyio.get_cancelled_exc_class():
            status, error = self._cancel_status(flight, branch)
            ended = self._clock.now()
            self._store.finish_attempt(attempt_id, status, ended, error=error)  # queued
            self._observe_attempt(spec, status, ended - started)
            log.info("attempt_finished", step=spec.step, attempt=spec.number, status=status)
            raise
        ended = self._clock.now()
        self._store.finish_attempt(  # queued: a plain call, nothing can cut it off
            attempt_id,
            outcome.status,
            ended,
            exit_code=outcome.exit_code,
            error=outcome.error,
            output=outcome.output,
            result=outcome.result,
        )
        self._observe_attempt(spec, outcome.status, ended - started)
        log_at = log.warning if outcome.status in _FAILED_ATTEMPTS else log.info
        log_at(
            "attempt_finished",
            step=spec.step,
            runner=spec.runner,
            attempt=spec.number,
            status=outcome.status,
            exit_code=outcome.exit_code,
            error=outcome.error,
            duration_ms=round((ended - started).total_seconds() * 1000),
        )
        return outcome

    def _observe_attempt(self, spec: AttemptSpec, status: AttemptStatus, took: timedelta) -> None:
        self.observer.attempt_finished(spec.runner, str(status), took.total_seconds())

    @staticmethod
    async def _invoke(work: Work) -> Outcome:
        try:
            outcome: Outcome = await work()
        except Exception as exc:  # a runner must not raise; if one does, it is a failure
            return Outcome(AttemptStatus.FAILED, error=f"runner error: {type(exc).__name__}: {exc}")
        return outcome

    @staticmethod
    def _cancel_status(flight: InFlight, branch: Branch) -> tuple[AttemptStatus, str]:
        if flight.reason is CancelReason.USER:
            return AttemptStatus.CANCELLED, "cancelled on request"
        if flight.reason is CancelReason.LEASE:
            return AttemptStatus.INTERRUPTED, LEASE_INTERRUPTION
        if flight.reason is None and branch.cancelled_by is not None:
            return AttemptStatus.CANCELLED, f"cancelled: step {branch.cancelled_by!r} failed"
        return AttemptStatus.INTERRUPTED, SHUTDOWN_INTERRUPTION

    # -- endings ---------------------------------------------------------------------------

    async def _after_cancel(self, dispatch: Dispatch, flight: InFlight) -> DispatchStatus:
        if flight.reason is CancelReason.USER:
            return await self._finish(dispatch, DispatchStatus.CANCELLED, "cancelled on request")
        reason = "lease" if flight.reason is CancelReason.LEASE else "shutdown"
        with anyio.CancelScope(shield=True):
            try:
                await self._store.requeue(dispatch.id, self._clock.now())
            except DispatcherError as exc:
                if flight.reason is not CancelReason.LEASE:
                    raise
                # Fenced or unreachable: whoever reaps our lease requeues it.
                log.warning("dispatch_requeue_failed", reason=reason, error=str(exc))
        log.info("dispatch_requeued", reason=reason)
        return DispatchStatus.QUEUED

    async def _finish(
        self, dispatch: Dispatch, status: DispatchStatus, error: str | None = None
    ) -> DispatchStatus:
        now = self._clock.now()
        error = None if error is None else limits.storable_text(error)
        self._store.finish_dispatch(dispatch.id, status, now, error)  # queued
        self.observer.dispatch_finished(dispatch.task, str(status))
        duration = (now - dispatch.created_at).total_seconds()
        log_at = log.error if status is DispatchStatus.FAILED else log.info
        log_at("dispatch_finished", status=status, error=error, duration_ms=round(duration * 1000))
        return status

    def _line_logger(self, step: str) -> ChildOutputLog:
        """A fresh sink per attempt: the flood limit applies to each attempt alone."""
        return ChildOutputLog(log, self.settings.log, step=step)


def storable(outcome: Outcome) -> Outcome:
    """What a step printed or raised, as text every store takes (no NUL, no lone
    surrogate): it is recorded, never refused."""
    error, output = outcome.error, outcome.output
    if error is not None:
        error = limits.storable_text(error)
    if output is not None:
        output = limits.storable_text(output)
    if error is outcome.error and output is outcome.output:
        return outcome
    return dataclasses.replace(outcome, error=error, output=output)


Results = Mapping[str, str | None]
"""Results of the steps done so far: step name -> JSON text (None: it gave none)."""


def _filled(step: Step, results: Results) -> tuple[tuple[str, ...], dict[str, Any]]:
    """A step's args and kwargs with the results they use filled in; `MissingResult`."""
    if not step.templated:
        return step.args, step.kwargs
    args = tuple(fill_results(arg, results) for arg in step.args)
    kwargs: dict[str, Any] = map_strings(step.kwargs, lambda text: fill_results(text, results))
    return args, kwargs


def _context(dispatch: Dispatch, step: str, attempt: int) -> StepContext:
    """Who the step is, as the runner hands it on."""
    return StepContext(
        dispatch_id=dispatch.id,
        task=dispatch.task,
        step=step,
        attempt=attempt,
        key=dispatch.key,
        token=functools.partial(dispatch.step_token, step),
    )
