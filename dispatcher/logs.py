"""structlog configuration: JSON lines on stdout, stdlib loggers in the same stream.

Exceptions are rendered as structured data (`exception` is a list of frames, no
locals) so one event stays one line. When stdout is the journal (`$JOURNAL_STREAM`
names it), each line starts with its syslog priority (`<3>` for an error), which
journald takes off and stores as the entry's PRIORITY: `journalctl -p err` then finds
the errors, and `journalctl -o cat` prints the JSON alone.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

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


CONSOLE_LEADING = ("dispatch_id", "task", "step", "status")
"""After the event, what a person at a terminal looks for first (console format)."""


def _console_fields(_logger: object, _name: str, event: EventDict) -> EventDict:
    """The console's order: `CONSOLE_LEADING`, then the rest as logged; no
    `instance_id` (the same on every line of one run), and the logger's name only
    for a library's record."""
    event.pop("instance_id", None)
    if str(event.get("logger", "")).startswith("dispatcher"):
        del event["logger"]
    head = {key: event.pop(key) for key in CONSOLE_LEADING if key in event}
    return {**head, **event}


SYSLOG_PRIORITIES = {
    "critical": 3,
    "fatal": 3,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}
"""syslog priority per level name; journald reads it from a `<N>` line prefix."""


def journal_prefix(level: str) -> str:
    """`<N>` for a level: the prefix journald turns into the entry's priority."""
    return f"<{SYSLOG_PRIORITIES.get(level, 6)}>"


def is_journal(stream: TextIO) -> bool:
    """Whether `stream` is the journal: systemd names that stream's device and inode
    in `$JOURNAL_STREAM` ("DEV:INODE") when stdout or stderr is connected to it."""
    dev, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        stat = os.fstat(stream.fileno())
        return (stat.st_dev, stat.st_ino) == (int(dev), int(inode))
    except (OSError, ValueError, AttributeError):  # no file descriptor, a bad value
        return False


class _Prioritised:
    """Wraps the renderer: its line starts with the event's journal prefix."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method_name: str, event: EventDict) -> str:
        level = str(event.get("level", method_name))
        return journal_prefix(level) + str(self._renderer(logger, method_name, event))


def _renderer(fmt: str, *, journal: bool = False, colors: bool = False) -> list[Processor]:
    processors: list[Processor]
    if fmt == "console":
        processors = [
            _console_fields,
            structlog.dev.ConsoleRenderer(
                colors=colors,
                sort_keys=False,
                exception_formatter=structlog.dev.plain_traceback,  # never show locals
            ),
        ]
    else:
        processors = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.UnicodeDecoder(),
            _leading_fields,
            structlog.processors.JSONRenderer(default=str),
        ]
    if journal:
        processors[-1] = _Prioritised(processors[-1])
    return processors


_METHOD_LEVELS = {"warn": "warning", "exception": "error", "fatal": "critical"}
_CONTEXT_PREFIX = "structlog_"


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class _JSONLine:
    """The JSON chain of `_shared_processors` + `_renderer("json")` in one step.

    An event without an exception or a stack (nearly all of them, and every one on the
    dispatch path) is rendered here directly, with the same fields in the same order,
    at a fraction of the chain's cost; any other goes through the chain itself.
    """

    def __init__(self, chain: list[Processor], *, journal: bool = False) -> None:
        self._chain = chain
        self._encode = json.JSONEncoder(default=_json_default).encode
        self._journal = journal

    def __call__(self, logger: Any, method_name: str, event: EventDict) -> Any:
        if "exc_info" in event or "stack_info" in event or "exception" in event:
            rendered: Any = event
            for processor in self._chain:
                rendered = processor(logger, method_name, rendered)
            return rendered
        level = _METHOD_LEVELS.get(method_name, method_name)
        line = {
            "timestamp": _timestamp(),
            "level": level,
            "event": event.pop("event", None),
        }
        line.update(event)
        for var, value in contextvars.copy_context().items():
            key = var.name
            if key.startswith(_CONTEXT_PREFIX) and value is not Ellipsis:
                line.setdefault(key[len(_CONTEXT_PREFIX) :], value)
        if "logger" not in line:
            name = getattr(logger, "name", None)
            if name is not None:
                line["logger"] = name
        if self._journal:
            return journal_prefix(level) + self._encode(line)
        return self._encode(line)


_second: tuple[int, str] = (-1, "")
"""The last whole second a line was stamped in, and its text: one tuple, replaced whole,
so a line logged on another thread never pairs one second with another's text."""


def _timestamp() -> str:
    """Now as `2026-12-01T11:51:02.123456Z` (UTC, microseconds always written): the
    second's text is made once a second, not once a line."""
    global _second
    now = time.time()
    second, text = _second
    if int(now) != second:
        second = int(now)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, text)
    return f"{text}.{int((now - second) * 1_000_000):06d}Z"


FLUSH_INTERVAL = 0.1
"""Lines are flushed at most this long after they were written (see `_Sink`)."""


class _Sink:
    """Where every line goes: one stream and one lock, shared with the stdlib handler.

    Lines collect in memory and are written out together: when `FLUSH_INTERVAL` has
    passed since the last write, when `MAX_PENDING` characters are waiting, and from
    `flush_loop`, so a reader (journald, `docker logs`) sees every line within 0.1 s.
    A write is a system call, during which the store's thread takes the GIL and the
    loop then waits for it back: one per line would cost more than rendering them.
    A SIGKILL can lose the lines of that last 0.1 s.
    """

    MAX_PENDING = 64 * 1024

    def __init__(self) -> None:
        self.stream: TextIO = sys.stdout
        self.lock = threading.RLock()
        self._pending: list[str] = []
        self._size = 0
        self._written_at = 0.0

    def write(self, line: str) -> None:
        with self.lock:
            self._pending.append(line)
            self._size += len(line)
            now = time.monotonic()
            if now - self._written_at >= FLUSH_INTERVAL or self._size >= self.MAX_PENDING:
                self._write_out(now)

    def flush(self) -> None:
        with self.lock:
            self._write_out(time.monotonic())

    def _write_out(self, now: float) -> None:
        self._written_at = now
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        self._size = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the daemon
            pass


class _SinkStream:
    """The stdlib handler's stream: its records join the same pending lines."""

    def write(self, text: str) -> None:
        if text.endswith("\n"):
            text = text[:-1]
        if text:
            _SINK.write(text)

    def flush(self) -> None:
        """Nothing: the sink writes within `FLUSH_INTERVAL` (and at exit)."""


_SINK = _Sink()
atexit.register(_SINK.flush)


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


_generation = 0
"""Bumped by `configure` and `reset`: loggers built before are rebuilt on next use."""


class _Direct:
    """What our loggers need to write a JSON line themselves (see `Logger`)."""

    __slots__ = ("level", "line", "processors")

    def __init__(self, processors: list[Processor], line: _JSONLine, level: int) -> None:
        self.processors = processors
        self.line = line
        self.level = level

    def active(self) -> bool:
        """Whether structlog's processors are still the ones `configure` set
        (`structlog.testing.capture_logs` changes them in place for a while)."""
        processors = self.processors
        return (
            len(processors) == 1
            and processors[0] is self.line
            and structlog.get_config()["processors"] is processors
        )


_direct: _Direct | None = None
"""Set by `configure` for the JSON format."""


class Logger:
    """What `structlog.get_logger(name)` gives, minus the cost of building a new bound
    logger on every call (a tenth of a rendered line, most of a filtered one).

    structlog's own `cache_logger_on_first_use` would keep a logger built before a
    later `configure` (the tests reconfigure); this one is rebuilt after `configure` or
    `reset`. (`structlog.testing.capture_logs` changes the processors in place, which
    a built logger sees.)

    `debug`, `info`, `warning` and `error` in the JSON format render and write their
    line directly, the same line structlog's bound logger would give (its filtering,
    its copy of the event, its dispatch to the processors: a quarter of a line's cost);
    anything else, and everything while the processors are not ours, goes through
    structlog.
    """

    __slots__ = ("_bound", "_generation", "_line", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None
        self._generation = -1
        self._line = _LineLogger(name)

    def __getattr__(self, method: str) -> Any:
        if self._generation != _generation:
            self._bound = structlog.get_logger(self._name).bind()
            self._generation = _generation
        return getattr(self._bound, method)

    def _write(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        direct = _direct
        if direct is None or not direct.active():
            self.__getattr__(method)(event, **fields)
            return
        if level >= direct.level:
            fields["event"] = event
            _SINK.write(direct.line(self._line, method, fields))

    def debug(self, event: str, **fields: Any) -> None:
        """A `debug` line."""
        self._write(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """An `info` line."""
        self._write(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """A `warning` line."""
        self._write(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """An `error` line."""
        self._write(logging.ERROR, "error", event, fields)


def get_logger(name: str) -> Any:
    """The logger of a module of ours (see `Logger`)."""
    return Logger(name)


class _Bound:
    __slots__ = ("_fields", "_tokens")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields
        self._tokens: dict[str, contextvars.Token[Any]] = {}

    def __enter__(self) -> None:
        self._tokens = dict(structlog.contextvars.bind_contextvars(**self._fields))

    def __exit__(self, *exc: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)


def bound(**fields: Any) -> _Bound:
    """`with logs.bound(step=...)`: the fields on every line logged inside, and what was
    bound before back afterwards. structlog's `bound_contextvars`, without its two reads
    of the whole context: it runs for every dispatch and every step."""
    return _Bound(fields)


def reset() -> None:
    """Back to structlog's defaults (tests)."""
    global _generation, _configured, _direct
    structlog.reset_defaults()
    _direct = None
    _generation += 1
    _configured = False


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


class _LibraryChatter(logging.Filter):
    """Libraries' `info` records (APScheduler's "Added job", "Running job", ...) are
    `debug` here: an operator's `info` stream is the daemon's own events."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and not record.name.startswith("dispatcher"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self._level <= logging.DEBUG
        return True


def _wants_colors(stream: TextIO) -> bool:
    """Colours for a person at a terminal (unless `$NO_COLOR` is set), never in a file."""
    try:
        return stream.isatty() and not os.environ.get("NO_COLOR")
    except (OSError, ValueError):
        return False


_configured = False


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send our events and the stdlib `logging` tree as lines to one stream.

    Our loggers render straight to the stream; library loggers pass through a
    `ProcessorFormatter` with the same processors, so both look the same. On the
    journal each line carries its syslog priority (see the module's docstring).
    """
    global _generation, _configured, _direct
    _SINK.flush()
    _SINK.stream = stream or sys.stdout
    journal = is_journal(_SINK.stream)
    colors = fmt == "console" and not journal and _wants_colors(_SINK.stream)
    renderer = _renderer(fmt, journal=journal, colors=colors)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(_SinkStream())
    handler.setFormatter(formatter)
    handler.addFilter(_LibraryChatter(_LEVELS[level]))
    handler.lock = _SINK.lock  # one lock for both writers: lines never interleave
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # Library chatter below WARNING is noise for an operator.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    chain: list[Processor] = [
        *_shared_processors(),
        structlog.processors.StackInfoRenderer(),
        *renderer,
    ]
    processors: list[Processor] = chain
    _direct = None
    if fmt == "json":
        line = _JSONLine(chain, journal=journal)
        processors = [line]
        _direct = _Direct(processors, line, _LEVELS[level])
    structlog.configure(
        processors=processors,
        logger_factory=_line_logger_factory,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=False,  # see `Logger`
    )
    _generation += 1
    _configured = True


def run_failed(message: str, exit_code: int) -> bool:
    """`dispatcher run` stops on a user's error (a bad configuration, a database it
    cannot open, another daemon on it): say so as a `daemon_failed` event in the log
    stream too, configured with the defaults if the configuration could not be read.

    Returns whether stderr is the journal as well, where the plain error line would
    be the same message again without a priority.
    """
    if not _configured:
        configure()
    get_logger("dispatcher.daemon").error("daemon_failed", error=message, exit_code=exit_code)
    flush()
    return is_journal(sys.stderr)
