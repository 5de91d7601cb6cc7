"""Run one subprocess from an argv list (never a shell) and turn its end into an Outcome.

The step is spawned directly (no wrapper, no `preexec_fn`, so CPython takes its vfork
path) in its own session and process group. It dies with the daemon, even when the
daemon is SIGKILLed: the group is registered with this process's guardian
(`dispatcher.runners.orphan_guard`) as soon as it exists, and the step carries the daemon's
token in its environment; once the daemon is gone the guardian kills the group and
every process carrying the token, grandchildren included. Timeout and cancellation
both stop the whole group: SIGTERM, then SIGKILL after `kill_grace`. When the main
process exits, whatever is left of its group is killed too, and the guardian kills
every process carrying this run's own token (`DISPATCHER_STEP_GUARD`): what left the group.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import os
import signal
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import anyio

from dispatcher import logs
from dispatcher.durations import format_duration
from dispatcher.models import RESOURCE_SHORTAGE, AttemptStatus
from dispatcher.runners.base import LineSink, Outcome
from dispatcher.runners.orphan_guard import GuardError, process_guard, step_token

MAX_LINE = 64 * 1024
"""A longer line reaches `on_line` in pieces of this many bytes (memory stays bounded)."""

MAX_KEPT_STDOUT = 16 * 1024 * 1024
"""With `keep_stdout` (a planner's plan), more stdout than this fails the run."""

_CHUNK = 64 * 1024
_DRAIN_TIMEOUT = 1.0
"""How long to keep reading the pipes after the group is gone (see `_supervise`)."""
_REAP_TIMEOUT = 5.0
_GROUP_GONE_TIMEOUT = 0.5  # killed members normally go within milliseconds

SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})
"""A process that cannot be started for one of these is the host's fault: the attempt
is `interrupted` (`RESOURCE_SHORTAGE`), tried again later, and uses up no retry."""

_log = logs.get_logger(__name__)


async def run_process(
    argv: Sequence[str],
    *,
    timeout: float,  # noqa: ASYNC109  # the step's configured limit, applied inside
    kill_grace: float,
    stdin: bytes | None = None,
    on_line: LineSink,
    tail_bytes: int = 8192,
    keep_stdout: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    label: str = "",
) -> Outcome:
    """Run `argv` to an Outcome: succeeded, failed (exit status or signal) or timed out.

    Each line of stdout and stderr goes to `on_line(stream, line)` (utf-8, invalid bytes
    replaced, newline stripped). `Outcome.output` is the last `tail_bytes` of both
    streams in arrival order; `Outcome.stdout` is the whole stdout when `keep_stdout`
    (more than `MAX_KEPT_STDOUT` bytes of it fail the run: memory stays bounded).
    A program that cannot be started is a failed Outcome, not an exception (an
    `interrupted` one when a resource is lacking, see `SHORTAGE_ERRNOS`). On
    cancellation the process group is stopped (shielded) and the cancellation re-raised.

    The environment (`env`, or the daemon's) gets the daemon's guard token and a token of
    this run's own (see `dispatcher.runners.orphan_guard`); `label` names the run in the
    guardian's log line when it kills what the run left behind.
    """
    if not argv:
        return Outcome(AttemptStatus.FAILED, error="cannot execute an empty command")
    output = _Output(on_line, tail_bytes, keep_stdout)
    try:
        child = await _Child.spawn(
            argv, output, stdin=stdin is not None, env=env, cwd=cwd, label=label
        )
    except (OSError, ValueError) as exc:
        error = _spawn_error(argv[0], cwd, exc)
        if isinstance(exc, OSError) and exc.errno in SHORTAGE_ERRNOS:
            return Outcome(AttemptStatus.INTERRUPTED, error=f"{RESOURCE_SHORTAGE}: {error}")
        return Outcome(AttemptStatus.FAILED, error=error)
    try:
        timed_out = await _supervise(child, stdin, timeout, kill_grace)
    finally:
        await _shielded(child.close(kill_grace))
    return _outcome(child.returncode, timed_out, timeout, output)


async def _supervise(child: _Child, stdin: bytes | None, limit: float, kill_grace: float) -> bool:
    """Wait for the exit (feeding stdin meanwhile); stop the group on timeout.

    The pipes are read by the protocol as data arrives. Returns whether the step
    timed out.
    """
    if stdin is None:
        return await _wait_and_drain(child, limit, kill_grace)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_feed, child.stdin, stdin)
        timed_out = await _wait_and_drain(child, limit, kill_grace)
        tg.cancel_scope.cancel()  # a child that neither reads nor exits its stdin
    return timed_out


async def _wait_and_drain(child: _Child, limit: float, kill_grace: float) -> bool:
    timed_out = not await child.wait_exit(limit)
    if timed_out:
        await child.terminate(kill_grace)
    # The step is over: background members of its group go with it.
    child.signal_group(signal.SIGKILL)
    # What they wrote is still in the pipes; read it. A grandchild that left the
    # group (setsid) could hold a pipe open for ever, hence the deadline.
    with anyio.move_on_after(_DRAIN_TIMEOUT):
        await child.drained()
    return timed_out


async def _shielded(cleanup: Coroutine[Any, Any, None]) -> None:
    """Run `cleanup` to its end even if this task is cancelled meanwhile.

    anyio's shield holds off anyio cancellation, but a native `Task.cancel()`
    (`asyncio.timeout`, `wait_for`) still interrupts an await. So the cleanup runs in
    its own task, and a native cancellation received meanwhile is re-raised after it.
    """
    task = asyncio.ensure_future(cleanup)
    cancelled = False
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """The stock stream protocol (for stdin), but stdout and stderr go straight into
    `output` as they arrive (no reader tasks), plus two events: the process exited,
    and both output pipes reached their end.

    `Process.wait()` also waits until the pipes close, which a background grandchild
    can put off indefinitely; `exited` lets the runner act on the exit itself.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, output: _Output) -> None:
        super().__init__(limit=_CHUNK, loop=loop)
        self.exited = asyncio.Event()
        self.drained = asyncio.Event()
        self._output = output
        self._lines = {1: ("stdout", _Lines()), 2: ("stderr", _Lines())}

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        entry = self._lines.get(fd)
        if entry is None:
            return  # detached
        stream, lines = entry
        assert isinstance(data, bytes)
        for raw, text in lines.feed(data):
            self._output.add(stream, raw, text)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in self._lines:
            stream, lines = self._lines.pop(fd)
            for raw, text in lines.finish():
                self._output.add(stream, raw, text)
            if not self._lines:
                self.drained.set()
        super().pipe_connection_lost(fd, exc)

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()

    def detach(self) -> None:
        """No more output: the run's result is being made (late pipe callbacks after
        a drain timeout must not reach the line sink)."""
        self._lines.clear()


class _Child:
    """A started subprocess: its pipes, its exit, and signals to its process group."""

    def __init__(
        self,
        transport: asyncio.SubprocessTransport,
        protocol: _Protocol,
        loop: asyncio.AbstractEventLoop,
        token: str,
        label: str,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._process = asyncio.subprocess.Process(transport, protocol, loop)
        self.pid = self._process.pid
        self.token = token
        self._label = label
        self._ended = False

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        output: _Output,
        *,
        stdin: bool,
        env: Mapping[str, str] | None,
        cwd: str | None,
        label: str,
    ) -> _Child:
        """Start `argv` in a new session, guarded; raises OSError when it cannot be
        executed (or when no guardian can be started: nothing is run then)."""
        loop = asyncio.get_running_loop()
        orphan_guard = process_guard()
        orphan_guard.start()  # before the first fork: every step carries the token
        token = step_token()
        # No preexec_fn: CPython then starts the child with vfork, the fast path.
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(loop, output),
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=orphan_guard.environment(os.environ if env is None else env, token),
            cwd=cwd,
            start_new_session=True,
        )
        child = cls(transport, protocol, loop, token, label)
        try:
            orphan_guard.add(child.pid)  # no await between the spawn and this
        except GuardError:
            await _shielded(child.close(0.0))
            raise
        return child

    @property
    def stdin(self) -> asyncio.StreamWriter:
        assert self._protocol.stdin is not None
        return self._protocol.stdin

    @property
    def exited(self) -> bool:
        return self._protocol.exited.is_set()

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode()

    def signal_group(self, signum: signal.Signals) -> None:
        """Send `signum` to every process of the child's group, if any is left."""
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    async def drained(self) -> None:
        """Wait until stdout and stderr reached their end (everything was read)."""
        await self._protocol.drained.wait()

    async def wait_exit(self, seconds: float) -> bool:
        """Wait up to `seconds` for the main process to exit; True if it has."""
        with anyio.move_on_after(seconds):
            await self._protocol.exited.wait()
        return self.exited

    async def terminate(self, kill_grace: float) -> None:
        """SIGTERM to the group; SIGKILL after `kill_grace` if the process still runs."""
        if self.exited:
            return
        self.signal_group(signal.SIGTERM)
        if await self.wait_exit(kill_grace):
            return
        self.signal_group(signal.SIGKILL)
        await self.wait_exit(_REAP_TIMEOUT)

    async def _group_gone(self) -> None:
        """Wait (briefly) until the members that had SIGKILL are gone: the signal is
        sent when killpg returns, not yet delivered. Orphans left as zombies under an
        init that does not reap would keep the group alive, hence the bound."""
        with anyio.move_on_after(_GROUP_GONE_TIMEOUT):
            while True:
                try:
                    os.killpg(self.pid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                await anyio.sleep(0.005)

    async def close(self, kill_grace: float) -> None:
        """Stop the group, close the pipes and wait for the transport to finish.

        Idempotent; afterwards no process of the group, no zombie and no open pipe is left.
        """
        await self.terminate(kill_grace)
        self.signal_group(signal.SIGKILL)
        self._protocol.detach()
        self._transport.close()
        if self.returncode is None:
            with anyio.move_on_after(_REAP_TIMEOUT):
                await self._process.wait()
        await self._group_gone()
        # Every member had SIGKILL: the group is over for the guardian too, and what
        # left the group goes now (once: close is idempotent).
        process_guard().discard(self.pid)
        if not self._ended:
            self._ended = True
            process_guard().end_step(self.token, self._label)


async def _feed(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write `data` to the child's stdin, then close it (EOF)."""
    try:
        writer.write(data)
        await writer.drain()
        writer.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child exited or closed stdin without reading everything


class _Lines:
    """Splits one stream into lines; a line longer than MAX_LINE comes out in pieces.

    Decoding is incremental, so a multi-byte character split across pieces survives.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, chunk: bytes) -> list[tuple[bytes, str]]:
        """Add `chunk`; return the complete lines (and long-line pieces) as (raw, text)."""
        self._pending += chunk
        pending = self._pending
        pieces = []
        start = 0
        while True:
            newline = pending.find(b"\n", start, start + MAX_LINE + 1)
            if newline >= 0:
                end = newline + 1
            elif len(pending) - start >= MAX_LINE:
                end = start + MAX_LINE
            else:
                break
            pieces.append(self._decode(bytes(pending[start:end])))
            start = end
        del pending[:start]
        return pieces

    def finish(self) -> list[tuple[bytes, str]]:
        """The last line, when the stream did not end with a newline."""
        raw = bytes(self._pending)
        self._pending.clear()
        text = self._decoder.decode(raw, final=True)
        return [(raw, text)] if raw or text else []

    def _decode(self, raw: bytes) -> tuple[bytes, str]:
        text = self._decoder.decode(raw)
        if text.endswith("\n"):
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
        return raw, text


class _Output:
    """Collects what the child prints: lines to the sink, a bounded tail, maybe stdout."""

    def __init__(self, on_line: LineSink, tail_bytes: int, keep_stdout: bool) -> None:
        self._on_line: LineSink | None = on_line
        self._keep = max(0, tail_bytes)
        self._tail = bytearray()
        self._stdout = bytearray() if keep_stdout else None
        self.stdout_overflowed = False

    def add(self, stream: str, raw: bytes, text: str) -> None:
        """Record one line (or piece of a long line) of `stream`."""
        if self._stdout is not None and stream == "stdout":
            if len(self._stdout) + len(raw) > MAX_KEPT_STDOUT:
                self.stdout_overflowed = True
                self._stdout.clear()
            elif not self.stdout_overflowed:
                self._stdout += raw
        self._tail += raw
        if len(self._tail) > 2 * self._keep:  # trim in batches: amortised O(1) per byte
            del self._tail[: len(self._tail) - self._keep]
        if self._on_line is not None:
            self._emit(self._on_line, stream, text)

    def _emit(self, on_line: LineSink, stream: str, text: str) -> None:
        try:
            on_line(stream, text)
        except Exception:
            # A broken sink must not lose the step's result; stop calling it.
            _log.exception("line_sink_failed", stream=stream)
            self._on_line = None

    def tail(self) -> str | None:
        """The last `tail_bytes` bytes printed, decoded; None when nothing was printed."""
        start = max(0, len(self._tail) - self._keep)
        if start:
            # Do not begin in the middle of a multi-byte character.
            while start < len(self._tail) and self._tail[start] & 0xC0 == 0x80:
                start += 1
        data = bytes(self._tail[start:])
        return data.decode("utf-8", errors="replace") or None

    def stdout(self) -> str | None:
        """All of stdout, when it was kept."""
        if self._stdout is None:
            return None
        return self._stdout.decode("utf-8", errors="replace")


def _outcome(returncode: int | None, timed_out: bool, timeout: float, output: _Output) -> Outcome:
    """Classify how the process ended."""
    status, error = AttemptStatus.FAILED, None
    if timed_out:
        status, error = AttemptStatus.TIMED_OUT, f"timed out after {format_duration(timeout)}"
    elif returncode is None:
        error = "did not exit after SIGKILL"
    elif output.stdout_overflowed:
        error = f"printed more than {MAX_KEPT_STDOUT // (1024 * 1024)} MiB on stdout"
    elif returncode == 0:
        status = AttemptStatus.SUCCEEDED
    elif returncode > 0:
        error = f"exited with status {returncode}"
    else:
        error = f"killed by signal {_signal_name(-returncode)}"
    return Outcome(
        status,
        exit_code=returncode,
        error=error,
        output=output.tail(),
        stdout=output.stdout(),
    )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"{signum}"


def _spawn_error(program: str, cwd: str | None, exc: OSError | ValueError) -> str:
    """One line saying why `program` could not be started."""
    if not isinstance(exc, OSError):
        return f"cannot execute {program!r}: {exc}"
    reason = exc.strerror or str(exc)
    if cwd is not None and exc.filename == cwd and program != cwd:
        return f"cannot execute {program!r}: working directory {cwd!r}: {reason}"
    return f"cannot execute {program!r}: {reason}"
