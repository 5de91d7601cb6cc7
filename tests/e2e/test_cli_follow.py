"""`submit --wait` and `submit --batch`, as a person at a terminal sees them (through a
pseudo-terminal) and as a script sees them (pipes)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, _env, wait_until

pytestmark = pytest.mark.slow

HOLD = Path(__file__).with_name("hold.py")


def config(tmp_path: Path, *, global_: int = 4) -> str:
    hold = f'"{sys.executable}", "{HOLD}", "{tmp_path}/release-{{name}}"'
    return f"""
[database]
path = "state/dispatcher.db"

[daemon]
poll_interval = "100ms"
shutdown_grace = "0s"
kill_grace = "1s"
heartbeat_interval = "300ms"
instance_ttl = "2s"

[gate]
global = {global_}

[runners.py]
type = "exec"

[runners.noop]
type = "noop"

[tasks.held]
steps = [{{ name = "hold", runner = "py", args = [{hold}] }}]

[tasks.quick]
steps = [{{ name = "q", runner = "noop", args = ["{{n}}"] }}]
"""


def release(tmp_path: Path, name: str) -> None:
    (tmp_path / f"release-{name}").touch()


class Terminal:
    """The CLI with stdin/stderr on a pseudo-terminal (stdout piped, as `$(...)` would).

    `until(predicate)` reads what the terminal shows until the predicate holds.
    """

    def __init__(self, daemon: Any, *args: str) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "--config", str(daemon.config), *args],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=slave,
            cwd=daemon.workdir,
            env={**_env(), "PYTHONPATH": str(ROOT)},
        )
        os.close(slave)
        self.shown = ""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # the process closed the terminal
            return False
        self.shown += chunk.decode("utf-8", "replace")
        return bool(chunk)

    def until(self, predicate: Callable[[str], bool], timeout: float = 60) -> str:
        def seen() -> bool:
            self._read(0.1)
            return predicate(self.shown)

        wait_until(seen, timeout=timeout, interval=0)
        return self.shown

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        while self._read(0.1) and self.proc.poll() is None:
            pass
        while self._read(0):
            pass
        assert self.proc.stdout is not None
        with self.proc.stdout:
            stdout = self.proc.stdout.read().decode()
        os.close(self.master)
        return code, stdout


@pytest.fixture
def daemon(tmp_path: Path, make_daemon: Any) -> Any:
    return make_daemon(config(tmp_path))


def test_wait_shows_the_id_at_once_then_a_live_line_then_the_result(
    tmp_path: Path, daemon: Any
) -> None:
    daemon.start()
    term = Terminal(daemon, "submit", "held", "--param", "name=a", "--wait")
    term.until(lambda shown: "dispatch 1 queued (created); waiting" in shown)
    live = term.until(lambda shown: "dispatch 1: running step 1/1 hold (attempt 1)" in shown)
    assert "\r\x1b[2Kdispatch 1: running step 1/1 hold (attempt 1) · " in live  # one line, redrawn
    release(tmp_path, "a")
    code, stdout = term.finish()
    assert (code, stdout) == (0, "1 succeeded\n")
    assert term.shown.endswith("\r\x1b[2K")  # the live line is cleared at the end
    assert daemon.stop() == 0


def test_wait_on_pipes_prints_no_live_line(tmp_path: Path, daemon: Any) -> None:
    daemon.start()
    release(tmp_path, "b")
    result = daemon.cli("submit", "held", "--param", "name=b", "--wait")
    assert (result.returncode, result.stdout) == (0, "1 succeeded\n")
    assert result.stderr == (
        "dispatch 1 queued (created); waiting for it to end "
        "(Ctrl-C stops waiting, not the dispatch)\n"
    )
    assert daemon.stop() == 0


def test_wait_without_a_daemon_warns_at_once_and_exits_69(daemon: Any) -> None:
    result = daemon.cli("submit", "quick", "--param", "n=1", "--wait")
    assert result.returncode == 69, result.stderr
    first, warning, error = result.stderr.splitlines()
    assert first.startswith("dispatch 1 queued (created); waiting")
    assert warning.startswith("dispatcher: warning: no live daemon heartbeats on this database")
    assert error == (
        "dispatcher: error: no live daemon heartbeats on this database (waited 5s); "
        "dispatch 1 stays queued until a daemon runs"
    )
    assert daemon.cli_json("show", "1")["status"] == "queued"


def test_wait_timeout_exits_75_and_the_dispatch_goes_on(tmp_path: Path, daemon: Any) -> None:
    daemon.start()
    result = daemon.cli("submit", "held", "--param", "name=c", "--wait", "--timeout", "1s")
    assert result.returncode == 75, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "dispatcher: error: dispatch 1 is still running after --timeout 1s; "
        "it goes on (dispatcher show 1)"
    )
    release(tmp_path, "c")
    daemon.wait_status(1, "succeeded")
    assert daemon.stop() == 0


def test_ctrl_c_stops_waiting_and_says_the_dispatch_goes_on(tmp_path: Path, daemon: Any) -> None:
    daemon.start()
    term = Terminal(daemon, "submit", "held", "--param", "name=d", "--wait")
    term.until(lambda shown: "running step 1/1" in shown)
    term.proc.send_signal(signal.SIGINT)
    code, stdout = term.finish()
    assert (code, stdout) == (130, "")
    assert "dispatcher: stopped waiting; dispatch 1 goes on" in term.shown
    assert "Traceback" not in term.shown
    assert daemon.cli_json("show", "1")["status"] == "running"
    release(tmp_path, "d")
    assert daemon.stop() == 0


def lines(*items: dict[str, Any]) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def test_batch_reports_every_bad_line_up_to_the_limit_and_writes_nothing(daemon: Any) -> None:
    good = {"task": "quick", "params": {"n": "1"}}
    batch = lines(good, {"task": "nope"}, good, {"task": "quick"}) + "not json\n"
    result = daemon.cli("submit", "--batch", "-", stdin=batch)
    assert result.returncode == 65
    assert result.stderr.splitlines() == [
        "dispatcher: error: batch line 2: unknown task 'nope' (known: held, quick)",
        "dispatcher: error: batch line 4: task 'quick': missing param 'n'",
        "dispatcher: error: batch line 5: invalid JSON: Expecting value at column 1",
        "dispatcher: error: 3 of 5 batch lines refused (listed above); nothing was submitted",
    ]
    many = daemon.cli("submit", "--batch", "-", stdin=lines(*[{"task": "nope"}] * 25))
    shown = many.stderr.splitlines()
    assert len(shown) == 21 and shown[19].startswith("dispatcher: error: batch line 20:")
    assert shown[20] == (
        "dispatcher: error: 25 of 25 batch lines refused (the first 20 listed above); "
        "nothing was submitted"
    )
    assert daemon.cli_json("list") == []


def test_batch_ends_with_a_summary_and_a_conflict_exits_65(daemon: Any) -> None:
    first = lines(*({"task": "quick", "params": {"n": str(n)}, "key": f"k{n}"} for n in range(3)))
    assert daemon.cli("submit", "--batch", "-", stdin=first).returncode == 0
    again = first + lines(
        {"task": "quick", "params": {"n": "new"}},
        {"task": "quick", "params": {"n": "other"}, "key": "k0"},
    )
    result = daemon.cli("submit", "--batch", "-", stdin=again)
    assert result.returncode == 65
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a.get("created") for a in answers] == [False, False, False, True, None]
    assert "already belongs to dispatch 1" in answers[4]["error"]
    assert result.stderr.splitlines()[-1] == (
        "dispatcher: batch: 5 lines: 1 created, 3 existing, 1 conflicts"
    )


def test_batch_wait_follows_the_whole_batch_with_a_bar(tmp_path: Path, daemon: Any) -> None:
    batch = tmp_path / "batch.jsonl"
    items = [{"task": "quick", "params": {"n": str(n)}} for n in range(40)]
    items.append({"task": "held", "params": {"name": "e"}})
    batch.write_text(lines(*items))
    daemon.start()
    term = Terminal(daemon, "submit", "--batch", str(batch), "--wait")
    term.until(lambda shown: "waiting for 41 dispatches to end" in shown)
    bar = term.until(lambda shown: "waiting:" in shown and "/41 [" in shown)
    assert "%|" in bar  # tqdm's bar, on the terminal only
    release(tmp_path, "e")
    code, stdout = term.finish()
    assert code == 0
    assert len(stdout.splitlines()) == 41  # one JSON answer a line, on stdout
    assert "dispatcher: batch: 41 lines: 41 created, 0 existing, 0 conflicts" in term.shown
    assert "dispatcher: batch: 41 dispatches ended: 41 succeeded" in term.shown
    assert daemon.stop() == 0
