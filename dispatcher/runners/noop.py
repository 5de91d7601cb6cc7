"""The `noop` runner: succeeds at once. For tests and benchmarks."""

from __future__ import annotations

import anyio.lowlevel

from dispatcher.models import AttemptStatus
from dispatcher.runners.base import Outcome, RunRequest


class NoopRunner:
    """Returns a succeeded Outcome (exit code 0) without doing anything."""

    effects = False

    def __init__(self, name: str = "noop") -> None:
        self.name = name

    async def run(self, request: RunRequest) -> Outcome:
        """Succeed at once; still a checkpoint, so cancellation is honoured."""
        await anyio.lowlevel.checkpoint()
        return Outcome(AttemptStatus.SUCCEEDED, exit_code=0)
