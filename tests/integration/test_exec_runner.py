"""The exec runner and run_process, with real subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import anyio
import pytest

from dispatcher.models import AttemptStatus
from dispatcher.runners import ExecRunner, Outcome, RunRequest, run_process
from dispatcher.runners.process import MAX_LINE
from tests.helpers.processes import Lines, alive, wait_gone

pytestmark = pytest.mark.slow

PY = sys.executable


async def run(argv: list[str]) -> Outcome:
    return await run_process(argv, timeout=10, kill_grace=0.2, on_line=Lines())


async def read_pids(path: Path, count: int, within: float = 5.0) -> list[int]:
    """The pids a script wrote to `path`, one a line, once `count` are there."""
    file = anyio.Path(path)
    with anyio.fail_after(within):
        while True:
            lines = (await file.read_text()).split() if await file.exists() else []
            if len(lines) >= count:
                return [int(line) for line in lines]
            await anyio.sleep(0.02)


def request(*args: str, timeout: float = 10, sink: Lines | None = None) -> RunRequest:
    return RunRequest(
        dispatch_id=1,
        step="s",
        attempt=1,
        args=args,
        timeout=timeout,
        on_line=sink if sink is not None else Lines(),
    )


async def test_success_with_output_and_lines_of_both_streams() -> None:
    sink = Lines()
    script = "import sys; print('out1'); print('err1', file=sys.stderr); print('out2')"
    outcome = await ExecRunner("shell", kill_grace=0.2).run(request(PY, "-c", script, sink=sink))
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert outcome.exit_code == 0
    assert outcome.error is None
    assert sink.of("stdout") == ["out1", "out2"]
    assert sink.of("stderr") == ["err1"]
    assert outcome.output is not None
    assert sorted(outcome.output.splitlines()) == ["err1", "out1", "out2"]
    assert outcome.stdout is None


async def test_exit_status_is_a_failure() -> None:
    outcome = await ExecRunner("shell").run(request("sh", "-c", "echo oops >&2; exit 3"))
    assert outcome.status is AttemptStatus.FAILED
    assert outcome.exit_code == 3
    assert outcome.error == "exited with status 3"
    assert outcome.output == "oops\n"


async def test_death_by_signal_is_named() -> None:
    outcome = await ExecRunner("shell").run(request("sh", "-c", "kill -KILL $$"))
    assert outcome.status is AttemptStatus.FAILED
    assert outcome.exit_code == -signal.SIGKILL
    assert outcome.error == "killed by signal SIGKILL"


async def test_env_is_merged_and_cwd_applies(tmp_path: Path) -> None:
    runner = ExecRunner("shell", env={"STEP_VAR": "hello"}, cwd=str(tmp_path))
    outcome = await runner.run(request("sh", "-c", 'echo "$STEP_VAR $PATH"; pwd'))
    assert outcome.output == f"hello {os.environ['PATH']}\n{tmp_path}\n"


async def test_stdin_is_fed_and_stdout_kept() -> None:
    outcome = await run_process(
        ["cat"], timeout=10, kill_grace=0.2, stdin=b"a\nb\n", on_line=Lines(), keep_stdout=True
    )
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert outcome.stdout == "a\nb\n"


async def test_stdin_not_read_by_the_child_is_harmless() -> None:
    outcome = await run_process(
        ["true"], timeout=10, kill_grace=0.2, stdin=b"x" * 1_000_000, on_line=Lines()
    )
    assert outcome.status is AttemptStatus.SUCCEEDED


async def test_invalid_utf8_and_crlf() -> None:
    sink = Lines()
    script = r"import sys; sys.stdout.buffer.write(b'caf\xc3\xa9\r\nbad \xff\nend')"
    outcome = await run_process(
        [PY, "-c", script], timeout=10, kill_grace=0.2, on_line=sink, keep_stdout=True
    )
    assert sink.of("stdout") == ["café", "bad \ufffd", "end"]
    assert outcome.stdout == "café\r\nbad \ufffd\nend"


async def test_tail_is_bounded_and_keeps_the_end() -> None:
    script = "for i in range(10000): print(f'line {i}')"
    outcome = await run_process(
        [PY, "-c", script], timeout=10, kill_grace=0.2, on_line=Lines(), tail_bytes=100
    )
    assert outcome.output is not None
    assert len(outcome.output.encode()) <= 100
    assert outcome.output.endswith("line 9998\nline 9999\n")


async def test_multi_megabyte_output_stays_in_bounded_memory() -> None:
    count = 0
    size = 0

    def on_line(stream: str, line: str) -> None:
        nonlocal count, size
        count += 1
        size += len(line)

    script = "import sys\nline = 'y' * 999 + '\\n'\nfor _ in range(32_000): sys.stdout.write(line)"
    tracemalloc.start()
    try:
        outcome = await run_process(
            [PY, "-c", script], timeout=30, kill_grace=0.2, on_line=on_line, tail_bytes=4096
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert (count, size) == (32_000, 32_000 * 999)
    assert outcome.output is not None
    assert len(outcome.output) == 4096
    assert peak < 4_000_000, f"peak {peak} bytes for 32 MB of output"


async def test_one_megabyte_line_without_newline() -> None:
    sink = Lines()
    script = "import sys; sys.stdout.write('z' * 1_000_000)"
    outcome = await run_process(
        [PY, "-c", script], timeout=10, kill_grace=0.2, on_line=sink, keep_stdout=True
    )
    assert outcome.status is AttemptStatus.SUCCEEDED
    pieces = sink.of("stdout")
    assert "".join(pieces) == "z" * 1_000_000
    assert max(map(len, pieces)) <= MAX_LINE
    assert outcome.stdout == "z" * 1_000_000
    assert outcome.output == "z" * 8192


async def test_timeout_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    script = f"trap '' TERM; echo $$ > {pidfile}; sleep 100 & echo $! >> {pidfile}; wait"
    started = time.monotonic()
    outcome = await run_process(["sh", "-c", script], timeout=0.5, kill_grace=0.2, on_line=Lines())
    elapsed = time.monotonic() - started
    assert outcome.status is AttemptStatus.TIMED_OUT
    assert outcome.error == "timed out after 500ms"
    assert outcome.exit_code == -signal.SIGKILL
    assert 0.6 <= elapsed < 2.5
    assert wait_gone([int(pid) for pid in pidfile.read_text().split()]) == []


async def test_timeout_sigterm_suffices_for_a_polite_child() -> None:
    started = time.monotonic()
    outcome = await run_process(["sleep", "100"], timeout=0.2, kill_grace=5, on_line=Lines())
    assert outcome.status is AttemptStatus.TIMED_OUT
    assert outcome.exit_code == -signal.SIGTERM
    assert time.monotonic() - started < 2


async def test_anyio_cancellation_kills_the_whole_group(
    tmp_path: Path, stray_pids: list[int]
) -> None:
    pidfile = tmp_path / "pids"
    script = f"sleep 100 & echo $! > {pidfile}; echo $$ >> {pidfile}; exec sleep 100"
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, ["sh", "-c", script])
        stray_pids.extend(await read_pids(pidfile, 2))
        assert [pid for pid in stray_pids if alive(pid)] == stray_pids
        tg.cancel_scope.cancel()
    assert wait_gone(stray_pids) == []


async def test_native_cancellation_kills_the_group_and_reraises(
    tmp_path: Path, stray_pids: list[int]
) -> None:
    pidfile = tmp_path / "pids"
    script = f"trap '' TERM; sleep 100 & echo $! > {pidfile}; echo $$ >> {pidfile}; wait"
    task = asyncio.ensure_future(run(["sh", "-c", script]))
    stray_pids.extend(await read_pids(pidfile, 2))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The shielded cleanup finished before the cancellation surfaced.
    assert [pid for pid in stray_pids if alive(pid)] == []


async def test_background_members_die_when_the_main_process_exits(
    tmp_path: Path, stray_pids: list[int]
) -> None:
    pidfile = tmp_path / "pids"
    started = time.monotonic()
    outcome = await run(["sh", "-c", f"sleep 100 & echo $! > {pidfile}; echo done"])
    stray_pids.extend(await read_pids(pidfile, 1))
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert time.monotonic() - started < 2
    assert wait_gone(stray_pids) == []


async def test_a_grandchild_that_left_the_group_cannot_hold_the_run(
    tmp_path: Path, stray_pids: list[int]
) -> None:
    pidfile = tmp_path / "escaped"
    escape = f"import os, time; os.setsid(); open({str(pidfile)!r}, 'w').write(str(os.getpid()))"
    script = textwrap.dedent(
        f"""\
        "$0" -c "{escape}; time.sleep(100)" &
        while [ ! -s {pidfile} ]; do sleep 0.01; done
        echo left
        """
    )
    started = time.monotonic()
    outcome = await run_process(
        ["sh", "-c", script, PY], timeout=10, kill_grace=0.2, on_line=Lines()
    )
    stray_pids.extend(await read_pids(pidfile, 1))
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert outcome.output == "left\n"
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("program", "error"),
    [
        ("nosuch-binary", "No such file or directory"),
        ("{tmp}/plain.txt", "Permission denied"),
        ("{tmp}/garbage", "Exec format error"),
        ("{tmp}", "Permission denied"),
    ],
)
async def test_unstartable_program_is_a_one_line_failure(
    tmp_path: Path, program: str, error: str
) -> None:
    (tmp_path / "plain.txt").write_text("not a program\n")
    (tmp_path / "garbage").write_bytes(b"\x00\x01garbage")
    (tmp_path / "garbage").chmod(0o755)
    program = program.format(tmp=tmp_path)
    outcome = await ExecRunner("shell").run(request(program))
    assert outcome.status is AttemptStatus.FAILED
    assert outcome.error == f"cannot execute {program!r}: {error}"
    assert outcome.exit_code is None


async def test_empty_command_is_a_failure() -> None:
    outcome = await ExecRunner("shell").run(request())
    assert outcome.status is AttemptStatus.FAILED
    assert outcome.error == "cannot execute an empty command"


async def test_missing_working_directory_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    outcome = await ExecRunner("shell", cwd=missing).run(request("true"))
    assert outcome.status is AttemptStatus.FAILED
    assert outcome.error == (
        f"cannot execute 'true': working directory {missing!r}: No such file or directory"
    )


async def test_a_failing_line_sink_does_not_lose_the_result() -> None:
    calls = 0

    def on_line(stream: str, line: str) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("sink broke")

    outcome = await run_process(
        ["sh", "-c", "echo a; echo b; exit 4"], timeout=10, kill_grace=0.2, on_line=on_line
    )
    assert outcome.error == "exited with status 4"
    assert outcome.output == "a\nb\n"
    assert calls == 1


PARENT = """\
import asyncio, sys
from dispatcher.runners.process import run_process

async def main() -> None:
    await run_process(
        ["sh", "-c", "echo $$ > " + sys.argv[1] + "; exec sleep 60"],
        timeout=60, kill_grace=0.2, on_line=lambda stream, line: None,
    )

asyncio.run(main())
"""


def test_child_dies_with_a_sigkilled_parent(tmp_path: Path, stray_pids: list[int]) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen([PY, str(script), str(pidfile)])
    try:
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert parent.poll() is None, "the parent script ended early"
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.02)
        child = int(pidfile.read_text())
        stray_pids.append(child)
        assert alive(child)
    finally:
        parent.kill()
        parent.wait()
    assert wait_gone([child], within=2) == []
