"""What a step leaves behind ends with the step, however the step ends, while the
daemon runs on.

The step (`escaper.py`) double-forks a grandchild into a session of its own and drops
the daemon's token from its environment: neither the step's process group nor the
daemon-exit sweep can reach it, only the step's own token (`DISPATCHER_STEP_GUARD`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Daemon, wait_until

pytestmark = pytest.mark.slow

ESCAPER = Path(__file__).with_name("escaper.py")


def config(tmp_path: Path, then: str, timeout: str = "10m") -> str:
    args = json.dumps([sys.executable, str(ESCAPER), str(tmp_path / "grandchild.pid"), then])
    return f"""
[database]
path = "state/dispatcher.db"

[daemon]
poll_interval = "200ms"
shutdown_grace = "0s"
kill_grace = "1s"

[runners.sh]
type = "exec"

[tasks.escape]
steps = [{{ name = "s", runner = "sh", args = {args}, timeout = "{timeout}" }}]
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.fixture
def escapees() -> Iterator[list[int]]:
    """Grandchildren to kill at teardown, should a test fail with one alive."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_escapee(
    tmp_path: Path, make_daemon: Any, escapees: list[int], then: str, **options: str
) -> tuple[Daemon, int]:
    """A daemon running one escaper step; the grandchild's pid, alive and apart."""
    daemon = make_daemon(config(tmp_path, then, **options))
    daemon.start()
    submitted = daemon.cli("submit", "escape")
    assert submitted.returncode == 0, submitted.stderr
    pidfile = tmp_path / "grandchild.pid"
    wait_until(pidfile.exists, timeout=30)
    pid = int(pidfile.read_text())
    escapees.append(pid)
    assert os.getsid(pid) != os.getsid(daemon.proc.pid if daemon.proc else 0)
    return daemon, pid


def status(daemon: Daemon) -> str:
    return daemon.statuses()[1]


def assert_gone_while_the_daemon_runs(daemon: Daemon, pid: int) -> None:
    wait_until(lambda: not alive(pid), timeout=10)
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.cli("health").returncode == 0
    killed = daemon.wait_for_event("step_leftovers_killed")
    assert killed["processes"] == 1 and killed["step"] == "dispatch:1/s#1"


@pytest.mark.parametrize(("then", "final"), [("exit", "succeeded"), ("fail", "failed")])
def test_what_a_finished_step_left_is_killed(
    tmp_path: Path, make_daemon: Any, escapees: list[int], then: str, final: str
) -> None:
    daemon, pid = start_escapee(tmp_path, make_daemon, escapees, then)
    wait_until(lambda: status(daemon) == final, timeout=30)
    assert_gone_while_the_daemon_runs(daemon, pid)
    assert daemon.stop() == 0


def test_what_a_timed_out_step_left_is_killed(
    tmp_path: Path, make_daemon: Any, escapees: list[int]
) -> None:
    daemon, pid = start_escapee(tmp_path, make_daemon, escapees, "sleep", timeout="2s")
    wait_until(lambda: status(daemon) == "failed", timeout=30)
    attempts = daemon.cli_json("show", "1")["attempts"]
    assert [a["status"] for a in attempts] == ["timed_out"]
    assert_gone_while_the_daemon_runs(daemon, pid)
    assert daemon.stop() == 0


def test_what_a_cancelled_step_left_is_killed(
    tmp_path: Path, make_daemon: Any, escapees: list[int]
) -> None:
    daemon, pid = start_escapee(tmp_path, make_daemon, escapees, "sleep")
    assert alive(pid)
    assert daemon.cli("cancel", "1").returncode == 0
    wait_until(lambda: status(daemon) == "cancelled", timeout=30)
    assert_gone_while_the_daemon_runs(daemon, pid)
    assert daemon.stop() == 0


def test_what_a_step_interrupted_by_the_drain_left_is_killed(
    tmp_path: Path, make_daemon: Any, escapees: list[int]
) -> None:
    """The grandchild lacks the daemon's token: the guardian's sweep at the daemon's
    exit would miss it; the step's end reaches it."""
    daemon, pid = start_escapee(tmp_path, make_daemon, escapees, "sleep")
    assert daemon.stop() == 0  # shutdown_grace 0s: the step is interrupted
    wait_until(lambda: not alive(pid), timeout=10)
    wait_until(lambda: any(e.get("event") == "step_leftovers_killed" for e in daemon.events()))
    assert [a["status"] for a in daemon.cli_json("show", "1")["attempts"]] == ["interrupted"]
