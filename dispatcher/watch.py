"""Following dispatches to their end: `submit --wait` (one dispatch, with a live line
on a terminal) and `submit --batch --wait` (many, with a progress bar).

Both poll a `Source` (the database, or a daemon's HTTP API) and stop on a final
status, on `--timeout` (`WaitTimedOut`, exit 75) or when no daemon heartbeats on the
database for `DAEMON_GRACE` seconds (`Unavailable`, exit 69): nothing would ever end
the wait then. The dispatch itself is never touched: it goes on after the wait ends.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from dispatcher.durations import format_duration
from dispatcher.errors import EX_TEMPFAIL, DispatcherError, Unavailable
from dispatcher.models import DispatchStatus

if TYPE_CHECKING:
    from tqdm import tqdm

DAEMON_GRACE = 5.0
"""Seconds `--wait` gives a daemon to (re)appear before it exits 69: long enough for a
service restart, short enough that a forgotten daemon is noticed at once."""
DAEMON_CHECK_EVERY = 1.0
LIVE_LINE_WIDTH = 100
BAR_WIDTH = 100


class WaitTimedOut(DispatcherError):
    """`--timeout` passed before the dispatch (or batch) ended; it goes on."""

    exit_code = EX_TEMPFAIL


Show = Callable[[int], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Source:
    """Where a wait reads dispatches from."""

    show: Show
    """The dispatch as `show --json` answers it (with `waiting_for`, `attempts`)."""
    daemon_live: Callable[[], Awaitable[bool]] | None
    """Whether a daemon heartbeats on this database; None when the source is a daemon
    (its API): an answer proves it lives."""
    poll: float = 0.2


class _DaemonWatch:
    """Warns at once when no daemon is live; gives up after `DAEMON_GRACE` seconds."""

    def __init__(self, source: Source, err: TextIO, what: str) -> None:
        self._source = source
        self._err = err
        self._what = what
        self._checked_at = -DAEMON_CHECK_EVERY
        self._missing_since: float | None = None

    async def check(self, now: float) -> None:
        if self._source.daemon_live is None or now - self._checked_at < DAEMON_CHECK_EVERY:
            return
        self._checked_at = now
        if await self._source.daemon_live():
            self._missing_since = None
            return
        if self._missing_since is None:
            self._missing_since = now
            self._err.write(
                "dispatcher: warning: no live daemon heartbeats on this database; "
                f"waiting {DAEMON_GRACE:g}s for one (start it with `dispatcher run`)\n"
            )
            self._err.flush()
        elif now - self._missing_since >= DAEMON_GRACE:
            raise Unavailable(
                f"no live daemon heartbeats on this database (waited {DAEMON_GRACE:g}s); "
                f"{self._what} stays queued until a daemon runs"
            )


class LiveLine:
    """One line on a terminal, rewritten in place; nothing at all elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._on = out.isatty()
        self._shown = False

    def update(self, text: str) -> None:
        if not self._on:
            return
        self._out.write("\r\x1b[2K" + text[:LIVE_LINE_WIDTH])
        self._out.flush()
        self._shown = True

    def clear(self) -> None:
        if self._on and self._shown:
            self._out.write("\r\x1b[2K")
            self._out.flush()
            self._shown = False


def describe(data: dict[str, Any], elapsed: float) -> str:
    """The live line: `dispatch 17: running step 2/3 build (attempt 1) · 12s`."""
    status = data["status"]
    waiting = data.get("waiting_for")
    where = _step_text(data)
    if waiting:
        text = f"waiting for {waiting}" + (f" · {where}" if where else "")
    elif status == DispatchStatus.QUEUED and data.get("not_before"):
        text = f"queued (not before {data['not_before']})"
    else:
        text = status + (f" {where}" if where else "")
    return f"dispatch {data['id']}: {text} · {_elapsed(elapsed)}"


def _elapsed(seconds: float) -> str:
    """Whole seconds, steady on a live line: `7s`, `2m05s`, `1h02m05s`."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _step_text(data: dict[str, Any]) -> str:
    branches = data.get("running") or []
    if len(branches) > 1:  # parallel branches: `steps test (attempt 1), lint (attempt 2)`
        return "steps " + ", ".join(_branch_text(branch) for branch in branches)
    plan = data.get("plan")
    index = data.get("current_step", 0)
    if not plan or index >= len(plan):
        return ""
    text = f"step {index + 1}/{len(plan)} {plan[index]['name']}"
    attempts = [a for a in data.get("attempts", []) if a["step"] == plan[index]["name"]]
    if attempts and attempts[-1]["status"] == "running":
        text += f" (attempt {attempts[-1]['attempt']})"
    return text


def _branch_text(branch: dict[str, Any]) -> str:
    if branch["waiting_for"]:
        return f"{branch['step']} (waiting for {branch['waiting_for']})"
    if branch["attempt"] is None:
        return str(branch["step"])
    return f"{branch['step']} (attempt {branch['attempt']})"


async def follow_one(
    source: Source, dispatch_id: int, *, patience: float | None, err: TextIO
) -> dict[str, Any]:
    """Poll until the dispatch is final; answer it as `show --json` does."""
    started = time.monotonic()
    line = LiveLine(err)
    daemon = _DaemonWatch(source, err, f"dispatch {dispatch_id}")
    try:
        while True:
            data = await source.show(dispatch_id)
            if DispatchStatus(data["status"]).is_final:
                return data
            elapsed = time.monotonic() - started
            if patience is not None and elapsed >= patience:
                raise WaitTimedOut(
                    f"dispatch {dispatch_id} is still {data['status']} after --timeout "
                    f"{format_duration(patience)}; it goes on (dispatcher show {dispatch_id})"
                )
            line.update(describe(data, elapsed))
            await daemon.check(elapsed)
            await asyncio.sleep(source.poll)
    except asyncio.CancelledError:  # Ctrl-C: say what became of the dispatch
        line.clear()
        err.write(f"dispatcher: stopped waiting; dispatch {dispatch_id} goes on\n")
        raise
    finally:
        line.clear()


def progress(total: int, what: str, err: TextIO) -> tqdm[Any]:
    """A progress bar on a terminal (nothing elsewhere)."""
    from tqdm import tqdm  # only when a bar is made: 20 ms off every other command

    size = shutil.get_terminal_size()
    return tqdm(
        total=total,
        desc=what,
        unit="",
        file=err,
        disable=not err.isatty(),
        leave=False,
        # shutil falls back to $COLUMNS/$LINES (or 80x24) where the terminal reports
        # 0x0; tqdm would then hide the bar.
        ncols=min(size.columns, BAR_WIDTH),
        nrows=size.lines,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]",
    )


async def follow_many(
    source: Source, ids: Collection[int], *, patience: float | None, err: TextIO
) -> dict[int, dict[str, Any]]:
    """Poll until every dispatch is final, with a bar; answer each final dispatch."""
    pending = sorted(set(ids))
    done: dict[int, dict[str, Any]] = {}
    daemon = _DaemonWatch(source, err, "the rest of the batch")
    try:
        await _poll_many(source, pending, done, daemon, patience, err)
    except asyncio.CancelledError:  # Ctrl-C
        err.write(f"dispatcher: stopped waiting; {len(ids) - len(done)} dispatches go on\n")
        raise
    return done


async def _poll_many(
    source: Source,
    pending: list[int],
    done: dict[int, dict[str, Any]],
    daemon: _DaemonWatch,
    patience: float | None,
    err: TextIO,
) -> None:
    started = time.monotonic()
    total = len(pending)
    with progress(total, "waiting", err) as bar:
        while pending:
            still = []
            for dispatch_id in pending:
                data = await source.show(dispatch_id)
                if DispatchStatus(data["status"]).is_final:
                    done[dispatch_id] = data
                else:
                    still.append(dispatch_id)
            bar.update(len(pending) - len(still))
            pending = still
            if not pending:
                break
            elapsed = time.monotonic() - started
            if patience is not None and elapsed >= patience:
                raise WaitTimedOut(
                    f"{len(pending)} of {total} dispatches still not finished after "
                    f"--timeout {format_duration(patience)}; they go on"
                )
            await daemon.check(elapsed)
            await asyncio.sleep(source.poll)
