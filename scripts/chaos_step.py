"""A step for scripts/chaos: records its own start and end, as a program or a callable.

    python chaos_step.py LOG LABEL MILLISECONDS        (an `exec` step)
    chaos_step:step(LOG, LABEL, MILLISECONDS)          (a `python` step, async)

Each record is one line, `start|end LABEL TOKEN UNIX_TIME PID`, written with one
`write` on an O_APPEND file, so records of concurrent steps never interleave. TOKEN
is new for every execution and pairs a start with its end. The chaos checks read
these records, never the daemon's own counters.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time


def record(log: str, kind: str, label: str, token: str) -> None:
    """Append one record to `log`."""
    line = f"{kind} {label} {token} {time.time():.6f} {os.getpid()}\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def step(log: str, label: str, milliseconds: str) -> None:
    """The `python` runner's step: start, sleep, end (cancellable)."""
    token = os.urandom(8).hex()
    record(log, "start", label, token)
    await asyncio.sleep(int(milliseconds) / 1000)
    record(log, "end", label, token)


def main() -> int:
    log, label, milliseconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    token = os.urandom(8).hex()
    record(log, "start", label, token)
    time.sleep(milliseconds / 1000)
    record(log, "end", label, token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
