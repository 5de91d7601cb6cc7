"""The JSON log stream: one event a line, exceptions as data, never a raw traceback."""

from __future__ import annotations

import io
import json
import logging
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
    structlog.reset_defaults()


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
    lines = stream.getvalue().splitlines()
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
    line = stream.getvalue()
    assert (
        line.startswith('{"timestamp": ') and '"level": "info", "event": "daemon_started"' in line
    )
