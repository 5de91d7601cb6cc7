"""A program printing more than the daemon keeps: memory stays bounded, the run says so."""

from __future__ import annotations

import sys

import pytest

from dispatcher.models import AttemptStatus
from dispatcher.runners import process
from dispatcher.runners.process import run_process

PRINT_3_MB = "import sys; [sys.stdout.write('y' * 1023 + chr(10)) for _ in range(3 * 1024)]"


async def test_kept_stdout_past_its_limit_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "MAX_KEPT_STDOUT", 1024 * 1024)
    outcome = await run_process(
        [sys.executable, "-c", PRINT_3_MB],
        timeout=30,
        kill_grace=0.5,
        on_line=lambda stream, line: None,
        keep_stdout=True,
    )
    assert outcome.status is AttemptStatus.FAILED
    assert outcome.error == "printed more than 1 MiB on stdout"
    assert outcome.stdout == ""
    assert outcome.output is not None and len(outcome.output) <= 8192


async def test_within_the_limit_stdout_is_kept_whole() -> None:
    outcome = await run_process(
        [sys.executable, "-c", PRINT_3_MB],
        timeout=30,
        kill_grace=0.5,
        on_line=lambda stream, line: None,
        keep_stdout=True,
    )
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert outcome.stdout is not None and len(outcome.stdout) == 3 * 1024 * 1024
