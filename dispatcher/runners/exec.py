"""The `exec` runner: a step's args run as a subprocess, never through a shell."""

from __future__ import annotations

import os
from collections.abc import Mapping

from dispatcher.runners.base import Outcome, RunRequest
from dispatcher.runners.process import run_process


class ExecRunner:
    """Runs `request.args` as an argv list in its own process group.

    `env` is merged over the daemon's environment at each run; `cwd` is the working
    directory (the daemon's own when None). On timeout or cancellation the group gets
    SIGTERM, then SIGKILL after `kill_grace` seconds.
    """

    effects = True

    def __init__(
        self,
        name: str,
        *,
        kill_grace: float = 5.0,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.kill_grace = kill_grace
        self.env = dict(env) if env else None
        self.cwd = cwd

    async def run(self, request: RunRequest) -> Outcome:
        """Run the step's argv to an Outcome (see `run_process`)."""
        return await run_process(
            request.args,
            timeout=request.timeout,
            kill_grace=self.kill_grace,
            stdin=request.stdin,
            on_line=request.on_line,
            env=self._environment(),
            cwd=self.cwd,
            label=f"dispatch:{request.dispatch_id}/{request.step}#{request.attempt}",
        )

    def _environment(self) -> dict[str, str] | None:
        if self.env is None:
            return None
        return {**os.environ, **self.env}
