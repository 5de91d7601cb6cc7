"""structlog configuration: JSON lines on stdout, stdlib loggers in the same stream.

Exceptions are rendered as structured data (`exception` is a list of frames, no
locals) so one event stays one line.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

import anyio
import structlog
from structlog.typing import EventDict, Processor

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _leading_fields(_logger: object, _name: str, event: EventDict) -> EventDict:
    """timestamp, level and event first: a person scanning raw lines reads those first."""
    head = {key: event.pop(key) for key in ("timestamp", "level", "event") if key in event}
    return {**head, **event}


def _renderer(fmt: str) -> list[Processor]:
    if fmt == "console":
        return [structlog.dev.ConsoleRenderer(colors=False)]
    return [
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        ),
        structlog.processors.UnicodeDecoder(),
        _leading_fields,
        structlog.processors.JSONRenderer(default=str),
    ]


FLUSH_INTERVAL = 0.1
"""Lines are flushed at most this long after they were written (see `_Sink`)."""


class _Sink:
    """Where every line goes: one stream and one lock, shared with the stdlib handler.

    A flush is a system call, and at a few thousand events a second one per line costs
    more than rendering them. So lines are flushed when `FLUSH_INTERVAL` has passed
    since the last flush, and `flush_loop` flushes what an idle daemon left behind: a
    reader (journald, `docker logs`) sees every line within 0.1 s. A SIGKILL can lose
    the lines of that last 0.1 s.
    """

    def __init__(self) -> None:
        self.stream: TextIO = sys.stdout
        self.lock = threading.RLock()
        self._flushed_at = 0.0
        self._dirty = False

    def write(self, line: str) -> None:
        with self.lock:
            self.stream.write(line + "\n")
            now = time.monotonic()
            if now - self._flushed_at >= FLUSH_INTERVAL:
                self._flush(now)
            else:
                self._dirty = True

    def flush(self) -> None:
        with self.lock:
            if self._dirty:
                self._flush(time.monotonic())

    def _flush(self, now: float) -> None:
        self._flushed_at = now
        self._dirty = False
        try:
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the daemon
            pass


_SINK = _Sink()


class _LineLogger:
    """structlog's end of the chain for our own loggers: one rendered line a call.

    Writing directly (instead of through a stdlib `Logger` and `Handler`) costs less
    than half as much per event; library records still go through `logging`.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        _SINK.write(message)

    debug = info = warning = warn = error = critical = exception = fatal = msg


def _line_logger_factory(name: str = "dispatcher", *_args: object) -> _LineLogger:
    return _LineLogger(name)


async def flush_loop() -> None:
    """Flush buffered log lines every `FLUSH_INTERVAL` (run it as a daemon side task)."""
    try:
        while True:
            await anyio.sleep(FLUSH_INTERVAL)
            _SINK.flush()
    finally:
        _SINK.flush()


def flush() -> None:
    """Write out buffered log lines now."""
    _SINK.flush()


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send our events and the stdlib `logging` tree as lines to one stream.

    Our loggers render straight to the stream; library loggers pass through a
    `ProcessorFormatter` with the same processors, so both look the same.
    """
    _SINK.flush()
    _SINK.stream = stream or sys.stdout
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_renderer(fmt)],
    )
    handler = logging.StreamHandler(_SINK.stream)
    handler.setFormatter(formatter)
    handler.lock = _SINK.lock  # one lock for both writers: lines never interleave
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # Library chatter below WARNING is noise for an operator.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            *_renderer(fmt),
        ],
        logger_factory=_line_logger_factory,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=False,
    )
