"""The guardian: kills what a step left once the step ends, and a daemon's steps once
the daemon is gone, however it died.

Run as `python -I -S guardian.py TOKEN` by `dispatcher.runners.orphan_guard`, one per daemon
process, in a session of its own, with a pipe from the daemon as stdin. It reads lines:

    +PGID           a step's process group was started
    -PGID           that group was stopped and reaped
    !TOKEN [LABEL]  a step ended: kill now every process whose environment holds
                    `DISPATCHER_STEP_GUARD=TOKEN` (what it left behind, also outside its
                    group and session); LABEL names the step in the log line
    ~MS             the daemon's lease was renewed (several daemons on one database):
                    unless another `~` line comes within MS milliseconds, kill every
                    registered group and every carrier of the daemon's token, as at
                    end of file, but stay (`~0`: no deadline). A daemon frozen
                    (SIGSTOP, a VM paused) or cut off from the database sends none:
                    its steps end before another daemon may reap and rerun them.

Ended steps are dealt with as their lines arrive, while the daemon runs (the lines that
arrive during a scan and the short pause after it share the next scan of /proc). At end
of file (the daemon exited or was killed: the kernel closes its end of the pipe either
way) it sends SIGKILL to every group still registered, then to every process whose
environment holds `DISPATCHER_GUARD=TOKEN` (read from /proc/PID/environ): that catches a
step the daemon started but died before registering, and a grandchild that left its
group with setsid. Then it exits. It ignores SIGTERM, SIGINT, SIGHUP and SIGQUIT: its
life is the pipe's, so a stop signal sent to every process of the service cannot take
the guard away while the daemon drains.

Standard library only, and no package import: it starts in a few milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterator

VARIABLE = "DISPATCHER_GUARD"
"""The environment variable that carries the daemon's token into its steps."""

STEP_VARIABLE = "DISPATCHER_STEP_GUARD"
"""The environment variable that carries one step's own token into its processes."""

_TOKEN = re.compile(rb"[0-9a-f]{16,64}")
_LABEL = re.compile(rb"[A-Za-z0-9:/#_.()-]{1,200}")

_SCAN_ROUNDS = 50
"""Scans of /proc at most: a step forking while it is being killed needs another."""

_SCAN_GAP = 0.05
"""Seconds at least between two scans for ended steps (and twice the last scan's time):
the lines that arrive meanwhile share the next scan, so a daemon ending hundreds of
steps a second costs the guardian a few percent of a core, not most of one."""


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1]:
        print("usage: guardian.py TOKEN (stdin: +PGID / -PGID lines)", file=sys.stderr)
        return 2
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)
    groups = read_groups(0, on_deadline=lambda live: fence(argv[1], live))
    killed_groups = kill_groups(groups)
    killed = kill_carriers(argv[1], spare=groups)
    if killed_groups or killed:
        _report("guardian_killed_orphans", groups=killed_groups, processes=killed)
    return 0


def fence(token: str, groups: set[int]) -> None:
    """The daemon's lease deadline passed (it stopped renewing): end all its steps."""
    killed_groups = kill_groups(groups)
    killed = kill_carriers(token, spare=groups, also_spare={os.getppid()})
    _report("guardian_fenced", groups=killed_groups, processes=killed, daemon_pid=os.getppid())


def read_groups(fd: int, on_deadline: Callable[[set[int]], None] | None = None) -> set[int]:
    """Apply the lines read from `fd` until end of file; the groups left.

    The steps that ended (`!TOKEN`) are dealt with after each read; `on_deadline` is
    called when a lease deadline (`~MS`) passes with no renewal.
    """
    groups: set[int] = set()
    pending = b""
    deadline: float | None = None
    while True:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not _readable(fd, wait):
            deadline = None
            if on_deadline is not None:
                on_deadline(groups)
            continue
        chunk = _read(fd)
        if not chunk:
            return groups
        pending += chunk
        *lines, pending = pending.split(b"\n")
        ended: dict[bytes, bytes] = {}
        for line in lines:
            if line[:1] == b"~":
                deadline = _deadline(line[1:], deadline)
                continue
            step = apply(groups, line)
            if step is not None:
                ended[step[0]] = step[1]
        if ended:
            started = time.monotonic()
            kill_steps(ended)
            time.sleep(max(_SCAN_GAP, 2 * (time.monotonic() - started)))


def _deadline(ms: bytes, current: float | None) -> float | None:
    """The new deadline a `~MS` line sets (malformed: unchanged; 0: none)."""
    if not ms.isdigit() or len(ms) > 12:
        return current
    return time.monotonic() + int(ms) / 1000 if int(ms) else None


def _readable(fd: int, timeout: float | None) -> bool:
    """Whether `fd` has data (or end of file) within `timeout` seconds (None: wait)."""
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    except InterruptedError:  # pragma: no cover - PEP 475 retries already
        return True
    return bool(ready)


def apply(groups: set[int], line: bytes) -> tuple[bytes, bytes] | None:
    """One line of the protocol; anything malformed is ignored.

    Answers (token, label) for a step that ended, None otherwise.
    """
    sign, rest = line[:1], line[1:]
    if sign == b"!":
        token, _, label = rest.partition(b" ")
        if not _TOKEN.fullmatch(token):
            return None
        return token, label if _LABEL.fullmatch(label) else b""
    if not rest.isdigit():
        return None
    pgid = int(rest)
    if pgid <= 1:
        return None  # never killpg(0) (our own group) or init's
    if sign == b"+":
        groups.add(pgid)
    elif sign == b"-":
        groups.discard(pgid)
    return None


def kill_steps(ended: dict[bytes, bytes], proc: str = "/proc") -> int:
    """SIGKILL to every process carrying the token of a step that ended; how many.

    One log line per step that left any (its label names it).
    """
    needles = {STEP_VARIABLE.encode() + b"=" + token: label for token, label in ended.items()}
    killed: dict[bytes, set[int]] = {}
    quiet = 0
    for _ in range(_SCAN_ROUNDS):
        found = [(pid, needle) for pid, needle in carriers_of(needles, proc) if _kill(pid)]
        if not found:
            # Two scans in a row find none before it is over: one scan can miss a
            # process whose environment cannot be read for a moment (mid-exec).
            quiet += 1
            if quiet == 2:
                break
            time.sleep(0.01)
            continue
        quiet = 0
        for pid, needle in found:
            killed.setdefault(needle, set()).add(pid)
        time.sleep(0.01)  # let the killed exit, so the next scan sees what they forked
    for needle, pids in killed.items():
        label = needles[needle].decode() or None
        _report("step_leftovers_killed", processes=len(pids), step=label)
    return sum(len(pids) for pids in killed.values())


def kill_groups(groups: set[int]) -> int:
    """SIGKILL to each group; how many still had a member."""
    own = os.getpgrp()
    killed = 0
    for pgid in sorted(groups):
        if pgid == own:
            continue
        try:
            os.killpg(pgid, signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            pass
    return killed


def kill_carriers(
    token: str,
    proc: str = "/proc",
    spare: set[int] | None = None,
    also_spare: Collection[int] = (),
) -> int:
    """SIGKILL to every process carrying `token`, until two scans in a row find none;
    how many. (A child forked by the daemon just before it died shows the token only
    once it has exec'd; the second scan, 10 ms later, gives it that moment.)

    Members of the groups in `spare` are left out (already killed with their group:
    they can still be seen until they have exited), and so are the pids `also_spare`
    (the daemon itself, alive when its lease deadline passes). Without a readable
    `proc` (not Linux, or not mounted) there is nothing to scan.
    """
    spare = spare or set()
    killed: set[int] = set()
    quiet = 0
    for _ in range(_SCAN_ROUNDS):
        found = [
            pid
            for pid in carriers(token, proc)
            if pid not in also_spare and _pgid(pid) not in spare and _kill(pid)
        ]
        quiet = 0 if found else quiet + 1
        if quiet == 2:
            break
        killed.update(found)
        time.sleep(0.01)  # let the killed exit, so the next scan sees what they forked
    return len(killed)


def carriers(token: str, proc: str = "/proc") -> Iterator[int]:
    """The pids (other than ours) whose initial environment holds VARIABLE=token."""
    for pid, _ in carriers_of({f"{VARIABLE}={token}".encode()}, proc):
        yield pid


def carriers_of(needles: Collection[bytes], proc: str = "/proc") -> Iterator[tuple[int, bytes]]:
    """(pid, needle) for each process (other than ours) whose initial environment holds
    one of `needles` (`NAME=value` entries)."""
    own = os.getpid()
    try:
        entries = os.listdir(proc)
    except OSError:
        return
    for name in entries:
        if not name.isdigit() or int(name) == own:
            continue
        try:
            with open(f"{proc}/{name}/environ", "rb") as environ:
                data = environ.read()
        except OSError:
            continue  # gone, another user's, or not dumpable
        if any(needle in data for needle in needles):  # a cheap test first
            for entry in data.split(b"\0"):
                if entry in needles:
                    yield int(name), entry
                    break


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _read(fd: int) -> bytes:
    while True:
        try:
            return os.read(fd, 65536)
        except InterruptedError:  # pragma: no cover - PEP 475 retries already
            continue
        except OSError:
            return b""


def _report(event: str, **fields: object) -> None:
    """One JSON line on the daemon's log stream (stdout)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    line = {
        "timestamp": stamp,
        "level": "warning",
        "event": event,
        **fields,
        "pid": os.getpid(),
        "logger": "dispatcher.runners.orphan_guard.guardian",
    }
    try:
        print(_journal_prefix("<4>") + json.dumps(line), flush=True)
    except OSError:
        pass  # nobody reads the stream any more


def _journal_prefix(prefix: str) -> str:
    """`prefix` when stdout is the journal (as `dispatcher.logs.is_journal` decides)."""
    dev, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stdout.fileno())
        return prefix if (stat.st_dev, stat.st_ino) == (int(dev), int(inode)) else ""
    except (OSError, ValueError):
        return ""


if __name__ == "__main__":
    sys.exit(main(sys.argv))
