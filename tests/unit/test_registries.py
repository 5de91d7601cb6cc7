"""Runner types and planners are registries: a test adds its own kinds through them
alone, and the config and the daemon take them like the built-in ones."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dispatcher.config import RunnerSettings, Settings, TaskSettings, load_settings
from dispatcher.daemon import Daemon, spawns_processes
from dispatcher.errors import ConfigError
from dispatcher.models import AttemptStatus, DispatchStatus, NewDispatch, Step
from dispatcher.pipeline import InFlight
from dispatcher.planners import PLANNERS, PlanJob, Planned
from dispatcher.runners.base import RUNNER_TYPES, Outcome, RunnerType, RunRequest
from dispatcher.testing import FakeClock, InMemoryStore


class GreeterSettings(RunnerSettings):
    """`[runners.NAME]` of the test's own type: one key of its own."""

    greeting: str


@dataclass
class Greeter:
    """A runner that answers its greeting as the step's result."""

    name: str
    greeting: str
    effects: bool = False
    calls: list[RunRequest] = field(default_factory=list)

    async def run(self, request: RunRequest) -> Outcome:
        self.calls.append(request)
        result = f'"{self.greeting}, {" ".join(request.args)}"'
        return Outcome(AttemptStatus.SUCCEEDED, exit_code=0, result=result)


def _greeter(name: str, spec: GreeterSettings, settings: Settings) -> Greeter:
    return Greeter(name, spec.greeting)


class FixedTaskSettings(TaskSettings):
    """`[tasks.NAME]` of the test's own planner: the runner its one step runs on."""

    runner: str


class FixedPlanner:
    """Plans one step, `hello`, on the task's `runner`."""

    name = "fixed"
    settings = FixedTaskSettings
    spawns_processes = False
    external = False

    async def plan(self, job: PlanJob) -> Planned:
        assert isinstance(job.task, FixedTaskSettings)
        step = Step(name="hello", runner=job.task.runner, args=(job.dispatch.params["who"],))
        return Planned(Outcome(AttemptStatus.SUCCEEDED), (step,))


@pytest.fixture
def greeter_type() -> Iterator[None]:
    RUNNER_TYPES.register(RunnerType("greeter", GreeterSettings, _greeter, spawns_processes=False))
    try:
        yield
    finally:
        RUNNER_TYPES.unregister("greeter")


@pytest.fixture
def fixed_planner() -> Iterator[None]:
    PLANNERS.register(FixedPlanner())
    try:
        yield
    finally:
        PLANNERS.unregister("fixed")


CONFIG = """
[database]
path = "d.db"

[runners.hi]
type = "greeter"
greeting = "hello"
concurrency = 1

[tasks.greet]
steps = [{ name = "greet", runner = "hi", args = ["{who}"] }]
"""


def settings_of(tmp_path: Path, text: str) -> Settings:
    config = tmp_path / "dispatcher.toml"
    config.write_text(text)
    return load_settings(config, {})


async def run_one(settings: Settings, task: str, **params: str) -> tuple[Daemon, int]:
    """A daemon on the in-memory store runs one dispatch of `task` to its end."""
    store, clock = InMemoryStore(), FakeClock()
    daemon = Daemon(settings, store, clock=clock)
    reserved = await store.check_and_reserve(NewDispatch(task=task, params=params), clock.now())
    claimed = await store.claim_next(daemon.instance_id, clock.now(), set())
    assert claimed is not None and claimed.id == reserved.id
    assert await daemon.pipeline.run(claimed, InFlight(claimed.id)) is DispatchStatus.SUCCEEDED
    return daemon, reserved.id


@pytest.mark.usefixtures("greeter_type")
async def test_a_runner_type_registered_from_a_test_runs_a_dispatch(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, CONFIG)
    assert isinstance(settings.runners["hi"], GreeterSettings)
    assert not spawns_processes(settings)  # its type says so: no orphan guard needed

    daemon, dispatch_id = await run_one(settings, "greet", who="world")

    greeter = daemon.pipeline.runners["hi"]
    assert isinstance(greeter, Greeter)
    assert [call.args for call in greeter.calls] == [("world",)]
    [attempt] = await daemon.store.list_attempts(dispatch_id)
    assert (attempt.runner, attempt.status, attempt.result) == (
        "hi",
        AttemptStatus.SUCCEEDED,
        '"hello, world"',
    )
    assert "runner:hi" in {gate.name for gate in daemon.gate.snapshot()}  # its concurrency


@pytest.mark.usefixtures("greeter_type")
def test_a_registered_runner_type_has_its_keys_checked_by_its_own_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        settings_of(tmp_path, CONFIG.replace('greeting = "hello"\n', ""))
    assert str(missing.value).endswith("runners.hi.greeting: required key is missing")
    with pytest.raises(ConfigError) as unknown:
        settings_of(tmp_path, CONFIG.replace('greeting = "hello"', 'greeting = "hi"\ncwd = "/"'))
    assert str(unknown.value).endswith("runners.hi.cwd: unknown key")


def test_a_runner_type_nobody_registered_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        settings_of(tmp_path, CONFIG)
    assert str(info.value) == (
        f"{tmp_path / 'dispatcher.toml'}: runners.hi.type: "
        "unknown runner type 'greeter' (known: exec, noop, python) (and 1 more problem)"
    )  # the other: `greeting`, a key no known type reads


@pytest.mark.usefixtures("greeter_type", "fixed_planner")
async def test_a_planner_registered_from_a_test_plans_a_dispatch(tmp_path: Path) -> None:
    text = CONFIG + '\n[tasks.fixed]\nplanner = "fixed"\nrunner = "hi"\n'
    settings = settings_of(tmp_path, text)
    assert isinstance(settings.tasks["fixed"], FixedTaskSettings)

    daemon, dispatch_id = await run_one(settings, "fixed", who="planner")

    dispatch = await daemon.store.get_dispatch(dispatch_id)
    assert dispatch is not None and [step.name for step in dispatch.plan or ()] == ["hello"]
    [attempt] = await daemon.store.list_attempts(dispatch_id)
    assert attempt.result == '"hello, planner"'
    with pytest.raises(ConfigError) as info:
        settings_of(tmp_path, text.replace('runner = "hi"\n', 'runner = "hi"\ncommand = ["x"]\n'))
    assert str(info.value).endswith("tasks.fixed.command: unknown key")
