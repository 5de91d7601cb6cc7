"""The `noop` runner: succeeds at once. For tests and benchmarks."""

from __future__ import annotations

import anyio.lowlevel

from dispatcher.config import RunnerSettings, Settings
from dispatcher.models import AttemptStatus
from dispatcher.runners.base import RUNNER_TYPES, Outcome, RunnerType, RunRequest


class NoopRunner:
    """Returns a succeeded Outcome (exit code 0) without doing anything."""

    effects = False

    def __init__(self, name: str = "noop") -> None:
        self.name = name

    async def run(self, request: RunRequest) -> Outcome:
        """Succeed at once; still a checkpoint, so cancellation is honoured."""
        await anyio.lowlevel.checkpoint()
        return Outcome(AttemptStatus.SUCCEEDED, exit_code=0)


def _build(name: str, spec: RunnerSettings, settings: Settings) -> NoopRunner:
    return NoopRunner(name)


RUNNER_TYPES.register(RunnerType("noop", RunnerSettings, _build, spawns_processes=False))
