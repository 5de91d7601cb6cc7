"""Limits at the edge of a run: a program printing more than the daemon keeps (memory
stays bounded, the run says so); a program that cannot start for lack of descriptors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dispatcher.models import RESOURCE_SHORTAGE, AttemptStatus
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


OUT_OF_DESCRIPTORS = """\
import asyncio, json, os, resource
from dispatcher.runners import run_process

def quiet(stream, line):
    pass

async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    first = await run_process(["true"], timeout=10, kill_grace=0.1, on_line=quiet)
    taken = []
    try:
        while True:
            taken.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    starved = await run_process(["true"], timeout=10, kill_grace=0.1, on_line=quiet)
    for fd in taken:
        os.close(fd)
    again = await run_process(["true"], timeout=10, kill_grace=0.1, on_line=quiet)
    print(json.dumps([first.status, starved.status, starved.error, again.status]))

asyncio.run(main())
"""


def test_a_process_that_cannot_start_for_lack_of_descriptors_is_interrupted_not_failed() -> None:
    """EMFILE at the spawn is the host's fault: `interrupted` (RESOURCE_SHORTAGE), which
    the pipeline tries again later without using up a retry."""
    result = subprocess.run(
        [sys.executable, "-c", OUT_OF_DESCRIPTORS], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    first, starved, error, again = json.loads(result.stdout.splitlines()[-1])
    assert (first, starved, again) == ("succeeded", "interrupted", "succeeded")
    assert error == f"{RESOURCE_SHORTAGE}: cannot execute 'true': Too many open files"
