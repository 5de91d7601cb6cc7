"""Plan: turn a dispatch into steps. Pure functions here; running a planner program is
the pipeline's job (it runs as an attempt through the gate).

- `steps`: the task's steps from the config, `{param}` filled in.
- `command`: an external program reads the dispatch as JSON on stdin and prints the
  plan as JSON: `{"steps": [{"name", "runner", "args", "timeout", "retries", "needs",
  "on_failure"}]}` (or the bare list).
- `python`: an importable callable `f(task, params)` returns the same structure.

A planner's args are taken literally, except `{steps.NAME.result[.FIELD]}`: a result
reference, filled when the step starts. Every plan is checked as a graph (see
`dispatcher.graph`) the way the config's steps are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from dispatcher import limits
from dispatcher.config import Settings, StepFields, StepSettings, TaskSettings, describe_error
from dispatcher.errors import BadRequest, PlanError
from dispatcher.graph import Node, check_graph
from dispatcher.models import Dispatch, Step
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
    if not step.results_used():
        args = (fill(arg, params) for arg in step.args)
        return _to_step(step, args, fill_value(step.kwargs, params))
    keep = (fill_params(arg, params) for arg in step.args)
    kwargs = map_strings(step.kwargs, lambda text: fill_params(text, params))
    return _to_step(step, keep, kwargs, templated=True)


def steps_plan(task: TaskSettings, params: Mapping[str, Any]) -> tuple[Step, ...]:
    return tuple(step_from_settings(step, params) for step in task.steps)


def check_params(task_name: str, task: TaskSettings, params: Mapping[str, Any]) -> None:
    """Refuse at submit time a submission that lacks a param its task uses."""
    missing = sorted(task.params_used() - set(params))
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise BadRequest(
            f"task {task_name!r}: missing param{'s' if len(missing) > 1 else ''} {names}"
        )


def task_gate_key(task_name: str, task: TaskSettings, params: Mapping[str, Any]) -> str | None:
    """The per-task gate a dispatch needs: `task:NAME` or `task:NAME:VALUE`, if any."""
    if task.concurrency is None:
        return None
    if task.concurrency_key is None:
        return f"task:{task_name}"
    return f"task:{task_name}:{fill(task.concurrency_key, params)}"


def task_gate_capacity(settings: Settings, gate: str) -> int | None:
    """Capacity of a per-task gate by its name, for gates made on demand."""
    if not gate.startswith("task:"):
        return None
    task_name = gate.split(":", 2)[1]
    task = settings.tasks.get(task_name)
    return task.concurrency if task else None


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
    runner = settings.runners.get(step.runner)
    if runner is None:
        known = ", ".join(sorted(settings.runners)) or "none defined"
        raise PlanError(f"{where}.runner: unknown runner {step.runner!r} (known: {known})")
    if runner.type == "python" and step.call is None:
        raise PlanError(f'{where}: a python runner step needs call = "module:func"')
    if not any(literal_refs(text) for text in [*step.args, *strings(step.kwargs)]):
        return _to_step(step, step.args, step.kwargs)
    kwargs = map_strings(step.kwargs, literal_with_refs)
    return _to_step(step, map(literal_with_refs, step.args), kwargs, templated=True)
