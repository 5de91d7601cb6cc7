"""The JSON log stream: one event a line, exceptions as data, never a raw traceback."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import structlog

from dispatcher import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    yield out
    logging.getLogger().handlers.clear()
    logs.reset()


def written(stream: io.StringIO) -> str:
    logs.flush()
    return stream.getvalue()


def _fail() -> None:
    raise ValueError("line one\nline two")


def test_exceptions_are_structured_one_line_events(stream: io.StringIO) -> None:
    log = structlog.get_logger("dispatcher.test")
    try:
        _fail()
    except ValueError:
        log.exception("dispatch_crashed", dispatch_id=7)
    try:
        _fail()
    except ValueError:
        logging.getLogger("some.library").exception("library trouble")
    lines = written(stream).splitlines()
    assert len(lines) == 2
    ours, theirs = (json.loads(line) for line in lines)
    assert ours["event"] == "dispatch_crashed" and ours["dispatch_id"] == 7
    assert ours["level"] == "error" and ours["timestamp"].endswith("Z")
    for event in (ours, theirs):
        (exception,) = event["exception"]
        assert exception["exc_type"] == "ValueError"
        assert exception["exc_value"] == "line one\nline two"
        assert exception["frames"][-1]["name"] == "_fail"
        assert "locals" not in exception["frames"][-1]
    assert theirs["logger"] == "some.library" and theirs["event"] == "library trouble"


def test_event_names_lead_each_line(stream: io.StringIO) -> None:
    structlog.get_logger("dispatcher.test").info("daemon_started", pid=1)
    line = written(stream)
    assert (
        line.startswith('{"timestamp": ') and '"level": "info", "event": "daemon_started"' in line
    )


def test_lines_are_written_together_and_promptly(stream: io.StringIO) -> None:
    log = structlog.get_logger("dispatcher.test")
    time.sleep(logs.FLUSH_INTERVAL)
    log.info("first")  # the first line after a quiet spell goes out at once
    assert stream.getvalue().count("\n") == 1
    for n in range(100):
        log.info("burst", n=n)
    assert stream.getvalue().count("\n") == 1  # held back, not one write per line
    time.sleep(logs.FLUSH_INTERVAL)
    log.info("later")  # the interval has passed: everything pending goes out
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["first", *["burst"] * 100, "later"]


def test_lines_still_pending_are_written_at_exit() -> None:
    """Lines are held back for up to 0.1 s: a process that exits before then (the CLI,
    a daemon's last lines) still writes them all."""
    script = (
        "import structlog\n"
        "from dispatcher import logs\n"
        "logs.configure('info', 'json')\n"
        "log = structlog.get_logger('dispatcher.test')\n"
        "for n in range(50):\n"
        "    log.info('burst', n=n)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["n"] for line in done.stdout.splitlines()] == list(range(50))


def test_a_module_logger_follows_each_new_configuration() -> None:
    """Our loggers keep their bound logger between calls, but never past a `configure`."""
    log = logs.get_logger("dispatcher.test")
    first, second = io.StringIO(), io.StringIO()
    try:
        logs.configure("info", "json", stream=first)
        log.info("one")
        log.debug("hidden")
        logs.configure("debug", "console", stream=second)
        log.debug("two")
        logs.flush()
    finally:
        logging.getLogger().handlers.clear()
        logs.reset()

    assert [json.loads(line)["event"] for line in first.getvalue().splitlines()] == ["one"]
    (line,) = second.getvalue().splitlines()
    assert "two" in line and not line.startswith("{")
