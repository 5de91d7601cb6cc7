"""The exec runner hands a step its context and takes back its result (real processes)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from dispatcher.models import AttemptStatus
from dispatcher.runners import ExecRunner, Outcome, RunRequest, StepContext

pytestmark = pytest.mark.slow

CONTEXT = StepContext(
    dispatch_id=9, task="ci", step="build", attempt=1, key=None, token=lambda: "t0"
)


async def run_script(script: str, env: dict[str, str] | None = None) -> Outcome:
    argv = (sys.executable, "-c", textwrap.dedent(script))
    request = RunRequest(
        dispatch_id=9, step="build", attempt=1, args=argv, timeout=20, context=CONTEXT
    )
    return await ExecRunner("sh", kill_grace=0.5, env=env).run(request)


async def test_an_exec_step_finds_its_context_in_its_environment_and_writes_a_result() -> None:
    outcome = await run_script(
        """
        import json, os
        names = ["DISPATCHER_" + n for n in
                 ("DISPATCH_ID", "TASK", "STEP", "ATTEMPT", "KEY", "STEP_TOKEN", "MINE")]
        with open(os.environ["DISPATCHER_RESULT"], "w") as out:
            json.dump({n: os.environ.get(n) for n in names}, out)
        """,
        env={"DISPATCHER_MINE": "runner env"},
    )
    assert outcome.status is AttemptStatus.SUCCEEDED, outcome.error
    assert json.loads(outcome.result or "") == {
        "DISPATCHER_DISPATCH_ID": "9",
        "DISPATCHER_TASK": "ci",
        "DISPATCHER_STEP": "build",
        "DISPATCHER_ATTEMPT": "1",
        "DISPATCHER_KEY": "",
        "DISPATCHER_STEP_TOKEN": "t0",
        "DISPATCHER_MINE": "runner env",
    }


async def test_a_step_that_writes_no_result_has_none() -> None:
    outcome = await run_script("print('hello')")
    assert (outcome.status, outcome.result) == (AttemptStatus.SUCCEEDED, None)


async def test_a_step_that_writes_a_bad_result_fails_with_one_line() -> None:
    outcome = await run_script(
        """
        import os
        open(os.environ["DISPATCHER_RESULT"], "w").write("{not json")
        """
    )
    assert outcome.status is AttemptStatus.FAILED
    assert outcome.exit_code == 0
    assert outcome.error is not None and outcome.error.startswith("result is not JSON: ")


async def test_the_result_of_a_failed_step_is_not_kept() -> None:
    outcome = await run_script(
        """
        import os, sys
        open(os.environ["DISPATCHER_RESULT"], "w").write("1")
        sys.exit(3)
        """
    )
    assert (outcome.status, outcome.exit_code, outcome.result) == (AttemptStatus.FAILED, 3, None)
