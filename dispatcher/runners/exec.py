"""The `exec` runner: a step's args run as a subprocess, never through a shell."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from pydantic import Field, field_validator

from dispatcher.config import Duration, RunnerSettings, Settings
from dispatcher.models import AttemptStatus
from dispatcher.runners.base import RUNNER_TYPES, Outcome, RunnerType, RunRequest
from dispatcher.runners.process import run_process
from dispatcher.runners.results import ResultError, read_result_file

RESULT_FILE = "result.json"


class ExecSettings(RunnerSettings):
    """`[runners.NAME]` of `type = "exec"`."""

    env: dict[str, str] = Field(default_factory=dict)
    """Merged over the daemon's environment at each run."""
    cwd: str | None = None
    """The steps' working directory (the daemon's own when unset)."""
    kill_grace: Duration | None = None
    """Seconds between SIGTERM and SIGKILL (`daemon.kill_grace` when unset)."""

    @field_validator("env")
    @classmethod
    def _env_can_be_passed(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if not name or "=" in name or "\x00" in name + value:
                raise ValueError(f"{name!r}: a name without '=' and text without NUL")
        return env


class ExecRunner:
    """Runs `request.args` as an argv list in its own process group.

    `env` is merged over the daemon's environment at each run, and the step's context
    (`DISPATCHER_DISPATCH_ID`, `DISPATCHER_STEP_TOKEN`, ...) over that. The step may
    write one JSON value to the file named by `DISPATCHER_RESULT` (a fresh folder per
    attempt): its result, read when it exits successfully. `cwd` is the working
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
        """Run the step's argv to an Outcome (see `run_process`), with its result."""
        with tempfile.TemporaryDirectory(prefix="dispatcher-", ignore_cleanup_errors=True) as tmp:
            result_path = Path(tmp) / RESULT_FILE
            outcome = await run_process(
                request.args,
                timeout=request.timeout,
                kill_grace=self.kill_grace,
                stdin=request.stdin,
                on_line=request.on_line,
                env=self._environment(request, result_path),
                cwd=self.cwd,
                label=f"dispatch:{request.dispatch_id}/{request.step}#{request.attempt}",
            )
            if not outcome.ok:
                return outcome
            try:
                return replace(outcome, result=read_result_file(result_path))
            except ResultError as exc:
                return replace(outcome, status=AttemptStatus.FAILED, error=str(exc))

    def _environment(self, request: RunRequest, result_path: Path) -> dict[str, str]:
        context = request.context.environment() if request.context is not None else {}
        return {
            **os.environ,
            **(self.env or {}),
            **context,
            "DISPATCHER_RESULT": str(result_path),
        }


def _build(name: str, spec: ExecSettings, settings: Settings) -> ExecRunner:
    kill_grace = spec.kill_grace if spec.kill_grace is not None else settings.daemon.kill_grace
    return ExecRunner(name, kill_grace=kill_grace, env=spec.env, cwd=spec.cwd)


RUNNER_TYPES.register(RunnerType("exec", ExecSettings, _build, spawns_processes=True))
