"""The orphan guard: a step, and whatever it started, dies with the daemon (real processes).

The "daemon" here is a small parent script that runs steps through `run_process`; the
tests SIGKILL it and wait until the step's processes are gone.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from dispatcher.models import AttemptStatus
from dispatcher.runners import ExecRunner, RunRequest, run_process
from dispatcher.runners.orphan_guard import (
    STEP_VARIABLE,
    VARIABLE,
    OrphanGuard,
    guardian,
    process_guard,
)
from tests.helpers.processes import Lines, alive, wait_gone

pytestmark = pytest.mark.slow

PY = sys.executable
GUARDIAN = [PY, "-I", "-S", guardian.__file__]


def wait_for_pids(path: Path, count: int, within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while True:
        pids = path.read_text().split() if path.exists() else []
        if len(pids) >= count:
            return [int(pid) for pid in pids]
        assert time.monotonic() < deadline, f"{path.name}: {pids}, wanted {count}"
        time.sleep(0.02)


def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as name:
        return name.read().strip()


def environ_of(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        return environ.read().split(b"\0")


STEP_PARENT = """\
import asyncio, json, sys
from dispatcher.runners import run_process
from dispatcher.runners.orphan_guard import process_guard

async def main() -> None:
    step = asyncio.ensure_future(run_process(
        json.loads(sys.argv[1]), timeout=60, kill_grace=0.2, on_line=lambda s, l: None
    ))
    while not process_guard().groups:
        await asyncio.sleep(0.01)
    open(sys.argv[2], "w").close()
    await step

asyncio.run(main())
"""
"""Runs one step; touches argv[2] once the step's group is registered with the guardian
(the step may run before that: until then only its token guards it)."""


def sigkill_parent_of(
    tmp_path: Path,
    step: list[str],
    pidfile: Path,
    count: int,
    check: Callable[[list[int]], None] = lambda pids: None,
) -> list[int]:
    """Run `step` under a parent script, wait for `count` pids in `pidfile`, `check`
    them, SIGKILL the parent; the pids."""
    script = tmp_path / "parent.py"
    script.write_text(STEP_PARENT)
    registered = tmp_path / "registered"
    parent = subprocess.Popen([PY, str(script), json.dumps(step), str(registered)])
    try:
        pids = wait_for_pids(pidfile, count)
        wait_for(registered.exists)
        assert parent.poll() is None, "the parent script ended early"
        assert all(alive(pid) for pid in pids)
        check(pids)
    finally:
        parent.kill()
        parent.wait()
    return pids


def test_a_grandchild_in_the_group_dies_with_a_sigkilled_parent(
    tmp_path: Path, stray_pids: list[int]
) -> None:
    """Killed by group (the second one does not even carry the token)."""
    pidfile = tmp_path / "pids"
    script = (
        f"sleep 60 & echo $! >> {pidfile}; "
        f"env -u {VARIABLE} sleep 60 & echo $! >> {pidfile}; "
        f"echo $$ >> {pidfile}; wait"
    )

    def without_token(pids: list[int]) -> None:
        stray_pids.extend(pids)
        wait_for(lambda: comm(pids[1]) == "sleep")  # env has exec'd sleep
        assert not any(entry.startswith(f"{VARIABLE}=".encode()) for entry in environ_of(pids[1]))

    pids = sigkill_parent_of(tmp_path, ["sh", "-c", script], pidfile, 3, without_token)
    assert wait_gone(pids, within=3) == []


def test_a_grandchild_that_left_the_group_dies_with_a_sigkilled_parent(
    tmp_path: Path, stray_pids: list[int]
) -> None:
    """Killed by the token scan: setsid put it in a session and group of its own."""
    pidfile = tmp_path / "pids"
    escaped = f"echo $$ >> {pidfile}; exec sleep 60"
    script = f"setsid sh -c '{escaped}' & echo $$ >> {pidfile}; wait"

    def apart(pids: list[int]) -> None:
        stray_pids.extend(pids)
        assert len({os.getsid(pid) for pid in pids}) == 2

    pids = sigkill_parent_of(tmp_path, ["sh", "-c", script], pidfile, 2, apart)
    assert wait_gone(pids, within=3) == []


def test_at_eof_the_guardian_kills_registered_groups_and_token_carriers() -> None:
    """The race: a step that carries the token but was never registered (the daemon
    died between the fork and the `+PGID`) is killed too. Nothing else is."""
    token = secrets.token_hex(8)
    carrier_env = {**os.environ, VARIABLE: token}
    plain_env = {key: value for key, value in os.environ.items() if key != VARIABLE}

    def sleeper(env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)

    unregistered_carrier = sleeper(carrier_env)
    registered = sleeper(plain_env)
    unregistered_again = sleeper(plain_env)
    bystander = sleeper({**plain_env, VARIABLE: "another-daemon"})
    everyone = [unregistered_carrier, registered, unregistered_again, bystander]
    keeper = subprocess.Popen(
        [*GUARDIAN, token],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        env=plain_env,
    )
    try:
        lines = f"+{registered.pid}\n+{unregistered_again.pid}\n-{unregistered_again.pid}\n"
        # then the end of file: the daemon is gone
        out, _ = keeper.communicate(lines.encode() + b"+0\n+1\n-\nnonsense\n", timeout=10)
        assert keeper.returncode == 0
        for proc in (unregistered_carrier, registered):
            assert proc.wait(timeout=5) == -signal.SIGKILL
        assert unregistered_again.poll() is None and bystander.poll() is None
        report = json.loads(out)
        assert report["event"] == "guardian_killed_orphans"
        assert (report["groups"], report["processes"]) == (1, 1)
    finally:
        for proc in everyone:
            proc.kill()
            proc.wait()


def ignored_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("SigIgn:"))
    return int(line.split()[1], 16)


def test_the_guardian_outlasts_stop_signals_and_ends_with_its_pipe() -> None:
    keeper = subprocess.Popen(
        [*GUARDIAN, secrets.token_hex(8)], stdin=subprocess.PIPE, start_new_session=True
    )
    try:
        assert keeper.stdin is not None
        keeper.stdin.write(b"+%d\n" % keeper.pid)  # never its own group
        keeper.stdin.flush()
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
        mask = sum(1 << (signum - 1) for signum in stops)
        wait_for(lambda: ignored_signals(keeper.pid) & mask == mask)
        for signum in stops:
            keeper.send_signal(signum)
        keeper.stdin.close()
        assert keeper.wait(timeout=10) == 0  # not -SIGTERM: it lived on to its EOF
    finally:
        keeper.kill()
        keeper.wait()


def test_the_protocol_ignores_what_it_does_not_know() -> None:
    groups: set[int] = set()
    for line in [b"+12", b"+13", b"-12", b"+0", b"+1", b"+-5", b"*9", b"", b"+x", b"-99"]:
        guardian.apply(groups, line)
    assert groups == {13}


def test_a_step_line_names_a_hex_token_and_a_plain_label() -> None:
    groups: set[int] = set()
    token = b"0123456789abcdef"
    assert guardian.apply(groups, b"!" + token + b" dispatch:1/s#1") == (token, b"dispatch:1/s#1")
    assert guardian.apply(groups, b"!" + token) == (token, b"")
    assert guardian.apply(groups, b"!" + token + b" bad label\x00") == (token, b"")
    for line in [b"!", b"!short", b"!" + token.upper(), b"!" + token + b"x", b"! " + token]:
        assert guardian.apply(groups, line) is None, line
    assert groups == set()


async def test_steps_carry_the_token_and_are_registered_while_they_run() -> None:
    sink = Lines()
    runner = ExecRunner("shell", env={"STEP_VAR": "x"})
    script = f'echo "${VARIABLE}"'
    for env_runner in (ExecRunner("shell"), runner):
        outcome = await env_runner.run(
            RunRequest(
                dispatch_id=1,
                step="s",
                attempt=1,
                args=("sh", "-c", script),
                timeout=10,
                on_line=sink,
            )
        )
        assert outcome.status is AttemptStatus.SUCCEEDED
    token = process_guard().token
    assert sink.of("stdout") == [token, token]
    assert os.environ[VARIABLE] == token
    assert process_guard().groups == frozenset()  # discarded once stopped and reaped


async def test_the_guardian_runs_apart_and_its_pipe_does_not_reach_steps() -> None:
    sink = Lines()
    outcome = await run_process(
        ["sh", "-c", "for fd in /proc/$$/fd/*; do readlink $fd; done; true"],
        timeout=10,
        kill_grace=0.2,
        on_line=sink,
    )
    assert outcome.status is AttemptStatus.SUCCEEDED
    orphan_guard = process_guard()
    pid = orphan_guard.pid
    assert pid is not None and alive(pid)
    assert os.getsid(pid) == pid  # its own session: a terminal's Ctrl-C does not reach it
    assert not any(entry.startswith(f"{VARIABLE}=".encode()) for entry in environ_of(pid))
    pipe = os.readlink(f"/proc/self/fd/{orphan_guard._fd}")
    assert pipe.startswith("pipe:")
    assert pipe not in sink.of("stdout")


RESTART_PARENT = """\
import asyncio, os, signal, sys, time
from dispatcher.runners import run_process
from dispatcher.runners.orphan_guard import process_guard

async def step(argv):
    await run_process(argv, timeout=60, kill_grace=0.2, on_line=lambda s, l: None)

async def main() -> None:
    out = sys.argv[1]
    first = asyncio.ensure_future(step(["sh", "-c", f"echo $$ >> {out}/first; exec sleep 60"]))
    while not os.path.exists(f"{out}/first"):
        await asyncio.sleep(0.01)
    old = process_guard().pid
    os.kill(old, signal.SIGKILL)
    while process_guard().pid in (old, None):  # the watcher thread starts another
        await asyncio.sleep(0.01)
    with open(f"{out}/guardians", "w") as f:
        f.write(f"{old} {process_guard().pid} {sorted(process_guard().groups)}\\n")
    second = asyncio.ensure_future(
        step(["sh", "-c", f"env -u DISPATCHER_GUARD sleep 60 & echo $! >> {out}/second; wait"])
    )
    while len(process_guard().groups) < 2:
        await asyncio.sleep(0.01)
    open(f"{out}/registered", "w").close()
    await second
    await first

asyncio.run(main())
"""


def test_a_killed_guardian_is_restarted_and_the_next_step_is_guarded(
    tmp_path: Path, stray_pids: list[int]
) -> None:
    script = tmp_path / "parent.py"
    script.write_text(RESTART_PARENT)
    parent = subprocess.Popen(
        [PY, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        first = wait_for_pids(tmp_path / "first", 1)
        # the second step's grandchild carries no token: only its registration saves it
        second = wait_for_pids(tmp_path / "second", 1)
        wait_for((tmp_path / "registered").exists)
        stray_pids.extend(first + second)
        old, new, groups = (tmp_path / "guardians").read_text().split(" ", 2)
        assert old != new and alive(int(new))
        assert groups.strip() == f"[{first[0]}]"  # the live group was registered again
        assert alive(first[0]) and alive(second[0])
    finally:
        parent.kill()
        out, _ = parent.communicate()
    assert b"guardian_restarted" in out
    assert wait_gone(first + second, within=3) == []
    assert wait_gone([int(new)], within=3) == []


async def test_no_guardian_no_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step is not run unguarded: when no guardian can start, it fails at once."""
    from dispatcher.runners import orphan_guard as guard_module

    monkeypatch.setenv(VARIABLE, os.environ.get(VARIABLE, "restored-at-teardown"))
    monkeypatch.setattr(guard_module, "_guard", OrphanGuard())
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    marker = tmp_path / "ran"
    outcome = await run_process(["touch", str(marker)], timeout=10, kill_grace=0.2, on_line=Lines())
    assert outcome.status is AttemptStatus.FAILED
    assert (
        outcome.error
        == "cannot execute 'touch': cannot start the guardian: No such file or directory"
    )
    assert not marker.exists()


def test_close_ends_the_guardian_which_kills_what_is_left(
    stray_pids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a graceful exit does (there the groups are already gone, so nothing is left)."""
    monkeypatch.setenv(VARIABLE, os.environ.get(VARIABLE, "restored-at-teardown"))
    orphan_guard = OrphanGuard(token=secrets.token_hex(8))
    plain_env = {key: value for key, value in os.environ.items() if key != VARIABLE}
    orphan_guard.start()
    assert os.environ[VARIABLE] == orphan_guard.token
    left = subprocess.Popen(["sleep", "60"], env=plain_env, start_new_session=True)
    stray_pids.append(left.pid)
    orphan_guard.add(left.pid)
    pid = orphan_guard.pid
    assert pid is not None
    orphan_guard.close()
    assert left.wait(timeout=5) == -signal.SIGKILL
    assert wait_gone([pid], within=5) == []


def test_a_held_descriptor_goes_to_every_guardian_the_restarted_one_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the daemon does with the instance lock: each guardian holds a copy, so that
    the lock outlives the daemon until its guardian is done."""
    monkeypatch.setenv(VARIABLE, os.environ.get(VARIABLE, "restored-at-teardown"))
    held = tmp_path / "held"

    def holds(pid: int | None) -> bool:
        assert pid is not None
        return str(held) in [
            os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
        ]

    orphan_guard = OrphanGuard(token=secrets.token_hex(8))
    with held.open("w") as handle:
        orphan_guard.hold(handle.fileno())
    orphan_guard.start()  # the caller's descriptor is closed: the guard kept its own copy
    first = orphan_guard.pid
    try:
        assert holds(first)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: orphan_guard.pid not in (first, None), within=10)
        second = orphan_guard.pid
        assert holds(second)
        with held.open("w") as handle:  # handed while one runs: that one is replaced
            orphan_guard.hold(handle.fileno())
        assert orphan_guard.pid != second
        assert holds(orphan_guard.pid)
        assert second is not None and wait_gone([second], within=5) == []
    finally:
        last = orphan_guard.pid
        orphan_guard.close()
    assert last is not None and wait_gone([last], within=5) == []


# -- a step's own token: what a step leaves ends with the step -----------------------


def test_a_step_token_line_kills_that_steps_carriers_at_once_and_nothing_else() -> None:
    step, other = secrets.token_hex(16), secrets.token_hex(16)
    daemon_token = secrets.token_hex(8)
    plain_env = {
        key: value for key, value in os.environ.items() if key not in (VARIABLE, STEP_VARIABLE)
    }

    def sleeper(**env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sleep", "60"], env={**plain_env, **env}, start_new_session=True)

    leftover = sleeper(**{STEP_VARIABLE: step})  # even without the daemon's token
    sibling = sleeper(**{STEP_VARIABLE: other, VARIABLE: daemon_token})
    bystander = sleeper()
    keeper = subprocess.Popen(
        [*GUARDIAN, daemon_token],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        env=plain_env,
    )
    try:
        assert keeper.stdin is not None and keeper.stdout is not None
        keeper.stdin.write(f"!{step} dispatch:7/build#2\n!nothex label\n".encode())
        keeper.stdin.flush()
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        report = json.loads(keeper.stdout.readline())
        assert report["event"] == "step_leftovers_killed"
        assert (report["processes"], report["step"]) == (1, "dispatch:7/build#2")
        assert keeper.poll() is None  # the daemon lives on: so does its guardian
        assert sibling.poll() is None and bystander.poll() is None
        keeper.stdin.close()  # now the daemon is gone: its token's carriers go too
        assert sibling.wait(timeout=10) == -signal.SIGKILL
        assert keeper.wait(timeout=10) == 0
        assert bystander.poll() is None
    finally:
        for proc in (leftover, sibling, bystander, keeper):
            proc.kill()
            proc.wait()
        if keeper.stdout is not None:
            keeper.stdout.close()


ESCAPE = """\
( setsid sh -c 'echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 60' \
  </dev/null >/dev/null 2>&1 & )
while [ ! -s {pidfile} ]; do sleep 0.01; done
{then}
"""
"""A step that double-forks a grandchild into a session of its own, then goes on."""


@pytest.mark.parametrize(
    ("then", "limit", "status"),
    [
        ("exit 0", 10.0, AttemptStatus.SUCCEEDED),
        ("exit 3", 10.0, AttemptStatus.FAILED),
        ("sleep 60", 0.5, AttemptStatus.TIMED_OUT),
    ],
)
async def test_the_grandchild_of_a_step_that_ended_is_killed(
    tmp_path: Path, stray_pids: list[int], then: str, limit: float, status: AttemptStatus
) -> None:
    pidfile = tmp_path / "escaped"
    script = ESCAPE.format(pidfile=pidfile, then=then)
    outcome = await run_process(
        ["sh", "-c", script], timeout=limit, kill_grace=0.2, on_line=Lines()
    )
    (pid,) = wait_for_pids(pidfile, 1)
    stray_pids.append(pid)
    assert outcome.status is status
    assert os.getsid(pid) == pid  # it had left the step's session
    assert wait_gone([pid], within=5) == []


async def test_the_grandchild_of_a_cancelled_step_is_killed(
    tmp_path: Path, stray_pids: list[int]
) -> None:
    pidfile = tmp_path / "escaped"
    script = ESCAPE.format(pidfile=pidfile, then="sleep 60")
    with anyio.move_on_after(30) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: run_process(
                    ["sh", "-c", script], timeout=60, kill_grace=0.2, on_line=Lines()
                )
            )
            (pid,) = await anyio.to_thread.run_sync(wait_for_pids, pidfile, 1)
            stray_pids.append(pid)
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert wait_gone([pid], within=5) == []


async def test_each_run_carries_a_token_of_its_own() -> None:
    sink = Lines()
    for _ in range(2):
        outcome = await run_process(
            ["sh", "-c", f'echo "${STEP_VARIABLE}"'], timeout=10, kill_grace=0.2, on_line=sink
        )
        assert outcome.status is AttemptStatus.SUCCEEDED
    first, second = sink.of("stdout")
    assert len(first) == 32 and first != second


def test_a_lease_deadline_that_passes_ends_the_steps_and_the_guardian_stays() -> None:
    """`~MS`: unless renewed in time the guardian ends every step of the daemon (it is
    frozen, or cut off from the database), and keeps watching; renewals keep them."""
    token = "a" * 32
    plain_env = {k: v for k, v in os.environ.items() if k != guardian.VARIABLE}

    def sleeper() -> subprocess.Popen[bytes]:
        env = {**plain_env, guardian.VARIABLE: token}
        return subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)

    keeper = subprocess.Popen(
        [PY, "-I", "-S", str(Path(guardian.__file__)), token],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert keeper.stdin is not None and keeper.stdout is not None
    renewed, fenced = sleeper(), sleeper()
    try:
        keeper.stdin.write(b"+%d\n~400\n" % renewed.pid)
        keeper.stdin.flush()
        for _ in range(4):  # renewed in time, four times over: nothing is killed
            time.sleep(0.2)
            keeper.stdin.write(b"~400\n")
            keeper.stdin.flush()
        assert renewed.poll() is None
        time.sleep(0.8)  # no renewal: the deadline passes
        assert renewed.wait(5) == -signal.SIGKILL  # its registered group
        assert fenced.wait(5) == -signal.SIGKILL  # a carrier of the daemon's token
        assert keeper.poll() is None  # the guardian stays for the daemon's next steps
        report = json.loads(keeper.stdout.readline())
        assert report["event"] == "guardian_fenced" and report["processes"] >= 1
    finally:
        for proc in (renewed, fenced):
            proc.kill()
            proc.wait(5)
        keeper.stdin.close()
        keeper.wait(10)
        keeper.stdout.close()
