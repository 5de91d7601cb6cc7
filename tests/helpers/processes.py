"""Watching real processes from tests: a line sink, and whether pids still run."""

from __future__ import annotations

import time


class Lines:
    """An on_line sink that keeps what it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, stream: str, line: str) -> None:
        self.seen.append((stream, line))

    def of(self, stream: str) -> list[str]:
        return [line for s, line in self.seen if s == stream]


def alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, waiting for a reaper, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], within: float = 3.0) -> list[int]:
    """Wait up to `within` seconds for `pids` to end; answers those still running."""
    deadline = time.monotonic() + within
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left
