"""The daemon's stream as journald sees it: priorities on every line, fatal errors as
events, one stream (stdout and stderr) holding nothing but JSON."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, STEP
from .test_daemon import config

pytestmark = pytest.mark.slow

FAILING = """
[tasks.fails]
steps = [{{ name = "boom", runner = "py", args = ["{python}", "{step}", "{log}", "x", "0", "3"] }}]
"""


SUBMIT = ("submit", "fails")


class Journal:
    """journald's side of a service's stdout: a stream socket, named in JOURNAL_STREAM."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stat = os.fstat(self.theirs.fileno())
        self.env = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        self._buffer = b""

    def lines(self) -> Iterator[str]:
        """Lines as they arrive, until the other side has closed."""
        self.ours.settimeout(60)
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                yield line.decode()
            chunk = self.ours.recv(65536)
            if not chunk:
                return
            self._buffer += chunk

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


@pytest.fixture
def journal() -> Iterator[Journal]:
    journal = Journal()
    yield journal
    journal.close()


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "JOURNAL_"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _run(config_path: Path, journal: Journal | None, cwd: Path) -> subprocess.Popen[bytes]:
    out: Any = journal.theirs if journal else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "--config", str(config_path), "run"],
        stdout=out,
        stderr=out,
        cwd=cwd,
        env=_env(journal.env if journal else {}),
    )


def _split(line: str) -> tuple[str, dict[str, Any]]:
    """`<N>{json}` into the prefix and the event (journald stores the rest as MESSAGE)."""
    assert line.startswith("<") and line[2:4] == ">{", line
    return line[:3], json.loads(line[3:])


def test_a_bad_configuration_is_an_event_on_stdout_and_one_line_on_stderr(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "dispatcher.toml"
    bad.write_text("[gate]\nglobal = 0\n")
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher", "--config", str(bad), "run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env({}),
    )
    assert done.returncode == 78
    (line,) = done.stdout.splitlines()
    event = json.loads(line)
    assert (event["level"], event["event"], event["exit_code"]) == ("error", "daemon_failed", 78)
    assert str(bad) in event["error"] and "gate.global" in event["error"]
    (message,) = done.stderr.splitlines()
    assert message == f"dispatcher: error: {event['error']}"


def test_on_the_journal_a_fatal_error_is_one_json_line_at_priority_err(
    tmp_path: Path, journal: Journal
) -> None:
    bad = tmp_path / "dispatcher.toml"
    bad.write_text("[gate]\nglobal = 0\n")
    proc = _run(bad, journal, tmp_path)
    assert proc.wait(60) == 78
    journal.theirs.close()  # ours now: the stream ends with the child's last line
    (line,) = journal.lines()  # stderr is the same stream: no plain-text duplicate
    prefix, event = _split(line)
    assert prefix == "<3>" and event["event"] == "daemon_failed"


def test_on_the_journal_every_line_carries_its_priority(tmp_path: Path, journal: Journal) -> None:
    text = config(tmp_path, global_=2) + FAILING.format(
        python=sys.executable, step=STEP, log=tmp_path / "steps.log"
    )
    (tmp_path / "dispatcher.toml").write_text(text)
    proc = _run(tmp_path / "dispatcher.toml", journal, tmp_path)
    try:
        seen: list[tuple[str, dict[str, Any]]] = []
        for line in journal.lines():
            seen.append(_split(line))
            if seen[-1][1]["event"] == "daemon_started":
                subprocess.run(
                    [sys.executable, "-m", "dispatcher", "--config", "dispatcher.toml", *SUBMIT],
                    check=True,
                    capture_output=True,
                    cwd=tmp_path,
                    env=_env({}),
                )
            if seen[-1][1]["event"] == "dispatch_finished":
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
                journal.theirs.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    by_event = {event["event"]: prefix for prefix, event in seen}
    assert by_event["daemon_started"] == "<6>"
    assert by_event["attempt_finished"] == "<4>"  # failed, exit code 3
    assert by_event["dispatch_finished"] == "<3>"  # failed
    assert by_event["daemon_stopped"] == "<6>"
