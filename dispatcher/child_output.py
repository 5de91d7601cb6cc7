"""Child output in the log, with flood protection.

Each line a step prints becomes a `step_output` event, until the step prints faster
than `[log] child_lines_per_second` for longer than `child_lines_burst` allows (a token
bucket per attempt). Then lines are dropped and counted: one `step_output_suppressed`
event says so when it starts, and one `step_output_summary` event gives the counts
when the attempt ends. A line longer than `child_line_max_bytes` is cut there
(`truncated: true`). The attempt's `output` tail in the database is not affected.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from dispatcher.config import LogSettings


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; starts full."""

    rate: float
    burst: float
    tokens: float
    last: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        """A bucket holding `burst` tokens at time `now`."""
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> bool:
        """Spend one token if there is one (refilled for the time since the last call)."""
        elapsed = max(0.0, now - self.last)  # a clock that goes back refills nothing
        self.last = now
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def cut_to_bytes(text: str, limit: int) -> tuple[str, int]:
    """`text` cut to at most `limit` UTF-8 bytes (never inside a character), and its size."""
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return text, len(raw)
    return raw[:limit].decode("utf-8", errors="ignore"), len(raw)


class ChildOutputLog:
    """The line sink of one attempt: logs, limits, counts. Call `close()` at its end.

    Made for every attempt, and most attempts print nothing (or have no process): the
    bucket is filled, and the logger bound to `fields`, at the first line only.
    """

    def __init__(
        self,
        logger: structlog.stdlib.BoundLogger,
        settings: LogSettings,
        monotonic: Callable[[], float] = time.monotonic,
        **fields: object,
    ) -> None:
        self._logger = logger
        self._fields = fields
        self._settings = settings
        self._enabled = settings.child_lines
        self._max_bytes = settings.child_line_max_bytes
        self._monotonic = monotonic
        self.lines = 0
        self.logged = 0
        self.suppressed = 0
        self.truncated = 0

    @functools.cached_property
    def _log(self) -> structlog.stdlib.BoundLogger:
        return self._logger.bind(**self._fields) if self._fields else self._logger

    @functools.cached_property
    def _bucket(self) -> TokenBucket:
        """Full at the first line, as it would be had it been filled at the attempt's
        start: a full bucket stays full."""
        settings = self._settings
        return TokenBucket.full(
            settings.child_lines_per_second, settings.child_lines_burst, self._monotonic()
        )

    def __call__(self, stream: str, line: str) -> None:
        """One line (or long-line piece) the child printed on `stream`."""
        self.lines += 1
        if not self._enabled:
            return
        if not self._bucket.take(self._monotonic()):
            self._suppress()
            return
        self.logged += 1
        text, size = cut_to_bytes(line, self._max_bytes)
        if size > self._max_bytes:
            self.truncated += 1
            self._log.info("step_output", stream=stream, line=text, truncated=True, bytes=size)
        else:
            self._log.info("step_output", stream=stream, line=text)

    def _suppress(self) -> None:
        self.suppressed += 1
        if self.suppressed == 1:
            self._log.warning(
                "step_output_suppressed",
                lines_logged=self.logged,
                lines_per_second=self._bucket.rate,
                burst=int(self._bucket.burst),
            )

    def close(self) -> None:
        """The attempt is over: one summary event if any line was dropped or cut."""
        if self.suppressed or self.truncated:
            self._log.info(
                "step_output_summary",
                lines=self.lines,
                lines_logged=self.logged,
                lines_suppressed=self.suppressed,
                lines_truncated=self.truncated,
            )
