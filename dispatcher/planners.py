"""Plan: turn a dispatch into steps. Each planner is an object here, registered in
`PLANNERS` by the name `[tasks.NAME] planner = "..."` gives:

- `steps`: the task's steps from the config, `{param}` filled in.
- `command`: an external program reads the dispatch as JSON on stdin and prints the
  plan as JSON: `{"steps": [{"name", "runner", "args", "timeout", "retries", "needs",
  "on_failure"}]}` (or the bare list).
- `python`: an importable callable `f(task, params)` returns the same structure.

Each declares the keys of `[tasks.NAME]` it reads (its settings model, a subclass of
`TaskSettings`), whether it may start processes, and whether it is external (a program
or user code: the pipeline runs it as an attempt). The pipeline calls `plan` and never
sees how a planner works.

A planner's args are taken literally, except `{steps.NAME.result[.FIELD]}`: a result
reference, filled when the step starts. Every plan is checked as a graph (see
`dispatcher.graph`) the way the config's steps are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio.to_thread
from pydantic import Field, ValidationError

from dispatcher import limits
from dispatcher.config import (
    Duration,
    Settings,
    StepFields,
    StepSettings,
    TaskSettings,
    check_call_spec,
    describe_error,
)
from dispatcher.errors import BadRequest, PlanError
from dispatcher.graph import Node, check_graph
from dispatcher.models import PLAN_STEP_NAME, AttemptStatus, Dispatch, Step
from dispatcher.registry import Registry
from dispatcher.runners.base import LineSink, Outcome
from dispatcher.runners.process import run_process
from dispatcher.runners.python import resolve_callable
from dispatcher.templating import (
    fill,
    fill_params,
    fill_value,
    literal_refs,
    literal_with_refs,
    map_strings,
    strings,
    template_fields,
)

MAX_PLAN_STEPS = 1000


def _to_step(
    fields: StepFields, args: Iterable[str], kwargs: dict[str, Any], templated: bool = False
) -> Step:
    return Step(
        name=fields.name,
        runner=fields.runner,
        args=tuple(args),
        timeout=fields.timeout,
        retries=fields.retries,
        backoff=fields.backoff,
        backoff_max=fields.backoff_max,
        call=fields.call,
        kwargs=kwargs,
        needs=None if fields.needs is None else tuple(fields.needs),
        on_failure=fields.on_failure,
        templated=templated,
    )


def step_from_settings(step: StepSettings, params: Mapping[str, Any]) -> Step:
    """A config step with its `{param}` templates filled; one that uses results keeps
    them, in template form, for its start."""
    if not step.results_used:
        args = (fill(arg, params) for arg in step.args)
        return _to_step(step, args, fill_value(step.kwargs, params))
    keep = (fill_params(arg, params) for arg in step.args)
    kwargs = map_strings(step.kwargs, lambda text: fill_params(text, params))
    return _to_step(step, keep, kwargs, templated=True)


def steps_plan(task: TaskSettings, params: Mapping[str, Any]) -> tuple[Step, ...]:
    """The steps written in the config, `{param}` filled in (the `steps` planner)."""
    return tuple(step_from_settings(step, params) for step in task.configured_steps())


def check_params(task_name: str, task: TaskSettings, params: Mapping[str, Any]) -> None:
    """Refuse at submit time a submission that lacks a param its task uses."""
    missing = sorted(task.params_used() - set(params))
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise BadRequest(
            f"task {task_name!r}: missing param{'s' if len(missing) > 1 else ''} {names}"
        )


def planner_input(dispatch: Dispatch) -> bytes:
    """What a `command` planner reads on stdin."""
    document = {"id": dispatch.id, "task": dispatch.task, "params": dispatch.params}
    return json.dumps(document).encode()


PLAN_LEVELS = 3
"""Levels of a plan around a step's kwargs: {"steps": [{"kwargs": ...}]}."""


def parse_plan_output(stdout: str) -> Any:
    """The JSON a planner printed; `PlanError` when it is not JSON or cannot be stored."""
    try:
        return limits.load_json(stdout, outer_levels=PLAN_LEVELS)
    except json.JSONDecodeError as exc:
        snippet = stdout.strip()[:80] or "nothing"
        raise PlanError(
            f"planner output is not JSON ({exc.msg} at line {exc.lineno}): {snippet!r}"
        ) from None
    except ValueError as exc:
        raise limits.refuse_as(PlanError, "planner output", exc) from None


def validate_plan(raw: Any, settings: Settings) -> tuple[Step, ...]:
    """Check a planner's plan against the config; `PlanError` names the bad place."""
    items = raw.get("steps") if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise PlanError('plan must be {"steps": [...]} or a list of steps')
    if not items:
        raise PlanError("plan has no steps")
    if len(items) > MAX_PLAN_STEPS:
        raise PlanError(f"plan has {len(items)} steps; the limit is {MAX_PLAN_STEPS}")
    steps = [_validate_step(index, item, settings) for index, item in enumerate(items)]
    names = [step.name for step in steps]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PlanError(f"plan: step names must be unique (repeated: {', '.join(duplicates)})")
    try:
        check_graph([_node(step) for step in steps])
    except ValueError as exc:
        raise PlanError(f"plan: {exc}") from None
    return tuple(steps)


def _node(step: Step) -> Node:
    """A planned step as the graph check sees it."""
    texts = [*step.args, *strings(step.kwargs)] if step.templated else []
    uses = frozenset(ref.step for text in texts for ref in template_fields(text)[1])
    return Node(step.name, step.needs, uses)


def _validate_step(index: int, item: Any, settings: Settings) -> Step:
    where = f"plan.steps[{index}]"
    if not isinstance(item, dict):
        raise PlanError(f"{where}: a step must be an object")
    try:
        step = StepFields.model_validate(item)
    except ValidationError as exc:
        _loc, message = describe_error(exc)
        raise PlanError(f"{where}.{message}") from None
    problem = settings.step_problem(step)
    if problem is not None:
        raise PlanError(f"{where}{problem}")
    if not any(literal_refs(text) for text in [*step.args, *strings(step.kwargs)]):
        return _to_step(step, step.args, step.kwargs)
    kwargs = map_strings(step.kwargs, literal_with_refs)
    return _to_step(step, map(literal_with_refs, step.args), kwargs, templated=True)


# -- the planners -----------------------------------------------------------------------


def _ignore_line(stream: str, line: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class PlanJob:
    """What a planner gets to plan one dispatch."""

    dispatch: Dispatch
    task: TaskSettings
    """The task's settings: an instance of the planner's `settings` model."""
    settings: Settings
    on_line: LineSink = _ignore_line
    """Where the lines an external planner prints go (the daemon's log)."""


@dataclass(frozen=True, slots=True)
class Planned:
    """How planning ended: the outcome of the planner's attempt, and the checked plan
    when it succeeded."""

    outcome: Outcome
    steps: tuple[Step, ...] | None = None


class Planner(Protocol):
    """A kind of planner: one object, registered in `PLANNERS` under its name."""

    @property
    def name(self) -> str:
        """What `[tasks.NAME] planner = "..."` says."""
        ...

    @property
    def settings(self) -> type[TaskSettings]:
        """The model of `[tasks.NAME]` for this planner: `TaskSettings` with the keys
        it reads (any other key is refused)."""
        ...

    @property
    def spawns_processes(self) -> bool:
        """Whether planning may start processes (then the orphan guard starts with the
        daemon, so that they carry its token)."""
        ...

    @property
    def external(self) -> bool:
        """A program or user code: the pipeline runs it as an attempt (its start made
        durable first, its interruptions counted) and it may read any param. False: a
        pure function of the config and the params."""
        ...

    async def plan(self, job: PlanJob) -> Planned:
        """Plan one dispatch. Raising is reserved for cancellation; every other problem
        is a failed `Outcome` with a one-line error."""
        ...


PLANNERS: Registry[Planner] = Registry("planner", lambda: None)
"""Every planner by name; each registers itself below, with one line."""


def planner_of(task: TaskSettings) -> Planner:
    """The planner a task names (validated with the config: always registered)."""
    return PLANNERS.require(task.planner)


T = TypeVar("T", bound=TaskSettings)


def _settings(job: PlanJob, model: type[T]) -> T:
    if not isinstance(job.task, model):
        raise TypeError(f"task {job.dispatch.task!r}: its settings are not {model.__name__}")
    return job.task


class StepsTaskSettings(TaskSettings):
    """`[tasks.NAME]` with `planner = "steps"` (the default)."""

    steps: list[StepSettings] = Field(default_factory=list)

    def check_planner_keys(self) -> None:
        if not self.steps:
            raise ValueError('planner "steps" needs a non-empty steps list')
        names = [step.name for step in self.steps]
        if len(names) != len(set(names)):
            raise ValueError("step names must be unique within a task")
        check_graph([step.node() for step in self.steps])

    def configured_steps(self) -> Sequence[StepSettings]:
        return self.steps


class StepsPlanner:
    """`steps`: the task's steps from the config, `{param}` filled in."""

    name = "steps"
    settings = StepsTaskSettings
    spawns_processes = False
    external = False

    async def plan(self, job: PlanJob) -> Planned:
        steps = steps_plan(_settings(job, StepsTaskSettings), job.dispatch.params)
        return Planned(Outcome(AttemptStatus.SUCCEEDED), steps)


class CommandTaskSettings(TaskSettings):
    """`[tasks.NAME]` with `planner = "command"`."""

    command: list[str] = Field(default_factory=list)
    """The planner program and its args (run directly, never through a shell)."""
    timeout: Duration = Field(default=60.0, gt=0)
    """How long the planner program may take."""

    def check_planner_keys(self) -> None:
        if not self.command:
            raise ValueError('planner "command" needs command = ["program", "arg", ...]')


class CommandPlanner:
    """`command`: a program reads the dispatch as JSON on stdin and prints the plan."""

    name = "command"
    settings = CommandTaskSettings
    spawns_processes = True
    external = True

    async def plan(self, job: PlanJob) -> Planned:
        task = _settings(job, CommandTaskSettings)
        outcome = await run_process(
            task.command,
            timeout=task.timeout,
            kill_grace=job.settings.daemon.kill_grace,
            stdin=planner_input(job.dispatch),
            on_line=job.on_line,
            keep_stdout=True,
            label=f"dispatch:{job.dispatch.id}/{PLAN_STEP_NAME}",
        )
        if not outcome.ok:
            return Planned(outcome)
        try:
            raw = parse_plan_output(outcome.stdout or "")
        except PlanError as exc:
            failed = Outcome(AttemptStatus.FAILED, outcome.exit_code, exc.message, outcome.output)
            return Planned(failed)
        return _checked(raw, job.settings, outcome)


class PythonTaskSettings(TaskSettings):
    """`[tasks.NAME]` with `planner = "python"`."""

    call: str | None = None
    """`package.module:function`, called as `f(task, params)`."""

    def check_planner_keys(self) -> None:
        if self.call is None:
            raise ValueError('planner "python" needs call = "module:function"')
        check_call_spec(self.call)


class PythonPlanner:
    """`python`: an importable callable `f(task, params)` returns the plan."""

    name = "python"
    settings = PythonTaskSettings
    spawns_processes = True
    """User code in the daemon: it may start processes of its own."""
    external = True

    async def plan(self, job: PlanJob) -> Planned:
        task = _settings(job, PythonTaskSettings)
        dispatch = job.dispatch
        try:
            planner = resolve_callable(task.call or "")
            raw = await anyio.to_thread.run_sync(planner, dispatch.task, dispatch.params)
        except Exception as exc:
            return Planned(Outcome(AttemptStatus.FAILED, error=f"{type(exc).__name__}: {exc}"))
        return _checked(raw, job.settings, Outcome(AttemptStatus.SUCCEEDED))


def _checked(raw: Any, settings: Settings, outcome: Outcome) -> Planned:
    """The plan a planner gave, validated (a failed outcome saying why when it is not)."""
    try:
        return Planned(outcome, validate_plan(raw, settings))
    except PlanError as exc:
        error = f"invalid plan: {exc.message}"
        return Planned(Outcome(AttemptStatus.FAILED, outcome.exit_code, error, outcome.output))


PLANNERS.register(StepsPlanner())
PLANNERS.register(CommandPlanner())
PLANNERS.register(PythonPlanner())
