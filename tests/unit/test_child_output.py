"""Flood protection for child output: a token bucket and a line size cap per attempt."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.child_output import ChildOutputLog, TokenBucket, cut_to_bytes
from dispatcher.config import LogSettings


class RecordingLogger:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append(("warning", event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.events if name == event]


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(settings: LogSettings) -> tuple[ChildOutputLog, RecordingLogger, FakeTime]:
    logger, clock = RecordingLogger(), FakeTime()
    return ChildOutputLog(logger, settings, monotonic=clock), logger, clock  # type: ignore[arg-type]  # a duck-typed logger


def test_bucket_grants_the_burst_then_the_rate() -> None:
    bucket = TokenBucket.full(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.1) and not bucket.take(0.1)  # one more token after 1/rate
    assert sum(bucket.take(100.0) for _ in range(10)) == 5  # never more than the burst


def test_bucket_ignores_a_clock_going_back() -> None:
    bucket = TokenBucket.full(rate=10, burst=1, now=5.0)
    assert bucket.take(5.0)
    assert not bucket.take(1.0)
    assert not bucket.take(1.05)  # refill counts from the last reading, not before it


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [("abc", 3, "abc"), ("abcd", 3, "abc"), ("ééé", 3, "é"), ("", 1, "")],
)
def test_cut_to_bytes_never_splits_a_character(text: str, limit: int, expected: str) -> None:
    assert cut_to_bytes(text, limit) == (expected, len(text.encode()))


def test_a_flood_is_suppressed_once_and_summarised() -> None:
    sink, logger, clock = make(LogSettings(child_lines_burst=10, child_lines_per_second=2))
    for n in range(10_000):
        sink("stdout", f"line {n}")
    clock.now += 1.0  # two more lines may pass
    sink("stdout", "late 1")
    sink("stdout", "late 2")
    sink("stdout", "late 3")
    sink.close()
    assert len(logger.named("step_output")) == 12
    (suppressed,) = logger.named("step_output_suppressed")
    assert suppressed["lines_logged"] == 10
    assert logger.named("step_output_summary") == [
        {"lines": 10_003, "lines_logged": 12, "lines_suppressed": 9_991, "lines_truncated": 0}
    ]


def test_a_quiet_step_gets_no_summary() -> None:
    sink, logger, _ = make(LogSettings())
    sink("stderr", "hello")
    sink.close()
    assert logger.events == [("info", "step_output", {"stream": "stderr", "line": "hello"})]


def test_a_long_line_is_cut_and_marked() -> None:
    sink, logger, _ = make(LogSettings(child_line_max_bytes=64))
    sink("stdout", "z" * 1000)
    sink.close()
    (line,) = logger.named("step_output")
    assert line == {"stream": "stdout", "line": "z" * 64, "truncated": True, "bytes": 1000}
    assert logger.named("step_output_summary")[0]["lines_truncated"] == 1


def test_child_lines_off_logs_nothing() -> None:
    sink, logger, _ = make(LogSettings(child_lines=False))
    for _ in range(5000):
        sink("stdout", "x")
    sink.close()
    assert logger.events == []
