"""The Runner protocol, the Outcome every runner returns, and the registry of runner
types (`RUNNER_TYPES`): what `[runners.NAME] type = "..."` can name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from dispatcher.models import AttemptStatus
from dispatcher.registry import Registry

if TYPE_CHECKING:
    from dispatcher.config import RunnerSettings, Settings, StepFields

LineSink = Callable[[str, str], None]
"""Called with (stream, line) for each line a step prints; stream is stdout or stderr."""


def _ignore_line(stream: str, line: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class StepContext:
    """Who a step is: the `DISPATCHER_*` variables of an exec step, and the `context`
    argument a python step asks for by naming a parameter so."""

    dispatch_id: int
    task: str
    step: str
    attempt: int
    key: str | None
    """The dispatch's idempotency key, if it has one."""
    token: Callable[[], str] = field(repr=False, compare=False)
    """Makes `step_token`: a digest, made only for a step that asks for it."""

    @property
    def step_token(self) -> str:
        """The same for every attempt of this step of this dispatch, across retries and
        daemon restarts: for a step to make its own effects idempotent."""
        return self.token()

    def environment(self) -> dict[str, str]:
        """The variables an exec step finds in its environment (DISPATCHER_KEY is empty
        when the dispatch has no key)."""
        return {
            "DISPATCHER_DISPATCH_ID": str(self.dispatch_id),
            "DISPATCHER_TASK": self.task,
            "DISPATCHER_STEP": self.step,
            "DISPATCHER_ATTEMPT": str(self.attempt),
            "DISPATCHER_KEY": self.key or "",
            "DISPATCHER_STEP_TOKEN": self.step_token,
        }


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One execution of one step: everything a runner needs, params already filled in."""

    dispatch_id: int
    step: str
    attempt: int
    args: tuple[str, ...]
    timeout: float
    call: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    stdin: bytes | None = None
    on_line: LineSink = _ignore_line
    context: StepContext | None = None
    """Who the step is (None where nobody asks: tests of a runner alone)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an execution ended. `output` is a bounded tail of what it printed."""

    status: AttemptStatus
    exit_code: int | None = None
    error: str | None = None
    output: str | None = None
    stdout: str | None = None
    """Full stdout, kept only when the caller asked for it (the command planner)."""
    result: str | None = None
    """The step's result as compact JSON text (see `dispatcher.runners.results`)."""

    @property
    def ok(self) -> bool:
        return self.status is AttemptStatus.SUCCEEDED


class Runner(Protocol):
    """Executes steps. Cancellation must stop the work and re-raise."""

    name: str
    effects: bool
    """Whether a step can act on the world (start a process, run user code). The start
    of such an attempt is made durable before it runs, so that a crash meanwhile is
    counted as an interruption and every execution has its attempt row."""

    async def run(self, request: RunRequest) -> Outcome:
        """Run one step to an Outcome; on timeout return status `timed_out`.

        Raising is reserved for cancellation; any other problem (missing binary,
        import error, exception in the callable) is an Outcome with status `failed`
        and a one-line `error`.
        """
        ...


S = TypeVar("S", bound="RunnerSettings")


def _any_step(step: StepFields) -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class RunnerType(Generic[S]):
    """A kind of runner, as its module declares it (one `RUNNER_TYPES.register(...)`
    line there): the configuration validates `[runners.NAME]` with `settings`, and the
    daemon makes the runner with `build`."""

    name: str
    """What `type = "..."` says."""
    settings: type[S]
    """The model of its `[runners.NAME]` table: `RunnerSettings` or a subclass adding
    its own keys (any other key is refused)."""
    build: Callable[[str, S, Settings], Runner]
    """`build(name, its settings, the whole settings)`: the runner of `[runners.NAME]`."""
    spawns_processes: bool
    """Whether its steps may start processes (then the orphan guard starts with the
    daemon, so that everything they start carries its token)."""
    check_step: Callable[[StepFields], str | None] = _any_step
    """Why a step (of the config or of a plan) cannot run on it, or None: checked when
    the config is loaded and when a plan is validated."""


def _load_runner_modules() -> None:
    from dispatcher import runners

    runners.load_modules()


RUNNER_TYPES: Registry[RunnerType[Any]] = Registry("runner type", _load_runner_modules)
"""Every runner type by name: each module of `dispatcher.runners` that defines one
registers it, and importing the package loads them all."""
