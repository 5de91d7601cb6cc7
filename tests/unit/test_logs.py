"""The JSON log stream: one event a line, exceptions as data, never a raw traceback."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import structlog.testing

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


def _journal_of(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As systemd does: $JOURNAL_STREAM names the device and inode of the stream."""
    stat = os.stat(path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")


def test_on_the_journal_each_line_starts_with_its_syslog_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    path.touch()
    _journal_of(path, monkeypatch)
    with path.open("w") as journal:
        logs.configure("debug", "json", stream=journal)
        log = structlog.get_logger("dispatcher.test")
        try:
            log.debug("looked")
            log.info("dispatch_finished", status="succeeded")
            log.warning("attempt_finished", status="failed")
            log.error("dispatch_finished", status="failed")
            try:
                _fail()
            except ValueError:
                log.exception("dispatch_crashed")
            logging.getLogger("some.library").warning("library trouble")
            logging.getLogger("some.library").critical("library disaster")
            logs.flush()
        finally:
            logging.getLogger().handlers.clear()
            logs.reset()
    lines = path.read_text().splitlines()
    prefixes = [line[: line.index("{")] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<3>", "<4>", "<3>"]
    events = [json.loads(line[3:]) for line in lines]  # the rest is the JSON, unchanged
    assert [e["level"] for e in events] == [
        *("debug", "info", "warning", "error", "error", "warning", "critical"),
    ]


def test_another_stream_gets_no_prefix_even_under_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$JOURNAL_STREAM is inherited by children whose stdout is something else (a
    pipe, a file): only the stream it names gets prefixes."""
    journal = tmp_path / "journal"
    journal.touch()
    _journal_of(journal, monkeypatch)
    with (tmp_path / "file").open("w") as other:
        logs.configure("info", "json", stream=other)
        try:
            structlog.get_logger("dispatcher.test").error("dispatch_finished")
            logs.flush()
        finally:
            logging.getLogger().handlers.clear()
            logs.reset()
    assert (tmp_path / "file").read_text().startswith('{"timestamp"')


def test_library_chatter_is_debug(stream: io.StringIO) -> None:
    """APScheduler announces every job run at INFO: that is debug for an operator."""
    scheduler = logging.getLogger("apscheduler.executors.default")
    scheduler.info('Running job "purge_gates"')
    scheduler.warning("Run time of job was missed")
    lines = [json.loads(line) for line in written(stream).splitlines()]
    assert [(e["level"], e["event"]) for e in lines] == [("warning", "Run time of job was missed")]

    shown = io.StringIO()
    logs.configure("debug", "json", stream=shown)
    scheduler.info('Running job "purge_gates"')
    (line,) = written(shown).splitlines()
    assert json.loads(line)["level"] == "debug"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_console_format_leads_with_what_a_person_looks_for() -> None:
    plain, terminal = io.StringIO(), _Terminal()
    try:
        for out in (plain, terminal):
            logs.configure("info", "console", stream=out)
            with structlog.contextvars.bound_contextvars(instance_id="4e0d986e7413"):
                structlog.get_logger("dispatcher.test").info(
                    "attempt_finished",
                    runner="shell",
                    attempt=1,
                    status="failed",
                    step="greet",
                    task="hello",
                    dispatch_id=7,
                )
            logs.flush()
    finally:
        logging.getLogger().handlers.clear()
        logs.reset()
    line = plain.getvalue().strip()
    assert "\x1b[" not in line  # no colours in a file or a pipe
    after_event = line.split("attempt_finished", 1)[1].split()
    assert after_event[:6] == [
        *("dispatch_id=7", "task=hello", "step=greet", "status=failed", "runner=shell"),
        "attempt=1",
    ]
    assert "instance_id" not in line and "4e0d986e7413" not in line
    assert "\x1b[" in terminal.getvalue()  # colours at a terminal


def test_bound_fields_are_on_the_lines_inside_and_what_was_bound_before_comes_back(
    stream: io.StringIO,
) -> None:
    log = structlog.get_logger("dispatcher.test")
    with logs.bound(dispatch_id=1, task="outer"):
        with logs.bound(task="inner", step="a"):
            log.info("inside")
        log.info("after_inner")
    log.info("outside")
    logs.flush()
    lines = [json.loads(line) for line in written(stream).splitlines()]
    fields = [{k: e.get(k) for k in ("dispatch_id", "task", "step")} for e in lines]
    assert fields == [
        {"dispatch_id": 1, "task": "inner", "step": "a"},
        {"dispatch_id": 1, "task": "outer", "step": None},
        {"dispatch_id": None, "task": None, "step": None},
    ]


def test_our_loggers_write_the_line_structlog_would(stream: io.StringIO) -> None:
    """`logs.get_logger` writes its JSON lines itself, skipping structlog's bound logger:
    the same fields in the same order as structlog's own path, levels filtered alike,
    timestamps ISO-8601 UTC with microseconds always written."""
    ours = logs.get_logger("dispatcher.same")
    theirs = structlog.get_logger("dispatcher.same")
    with logs.bound(dispatch_id=7, task="t"):
        for log in (ours, theirs):
            log.info("attempt_started", step="a", attempt=1)
            log.warning("step_deferred", reason="no memory")
            log.debug("not_at_info")
    lines = [json.loads(line) for line in written(stream).splitlines()]

    assert len(lines) == 4
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line.pop("timestamp"))
    assert [list(line.items()) for line in lines[:2]] == [list(line.items()) for line in lines[2:]]
    assert list(lines[0])[:4] == ["level", "event", "step", "attempt"]
    assert set(lines[0]) == {"level", "event", "step", "attempt", "dispatch_id", "task", "logger"}


def test_captured_logs_see_our_loggers_lines() -> None:
    """While `structlog.testing.capture_logs` holds the processors, our loggers go
    through structlog, so the capture sees their events."""
    logs.configure("info", "json", stream=io.StringIO())
    try:
        with structlog.testing.capture_logs() as events:
            logs.get_logger("dispatcher.same").info("captured", n=1)
        assert events == [{"event": "captured", "n": 1, "log_level": "info"}]
    finally:
        logs.reset()
