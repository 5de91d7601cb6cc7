"""A step for the lease tests: records its start, then a tick every 0.1 s, then its end.

usage: ticker.py LOG LABEL SECONDS

The tests run it with `python -S`: it needs the standard library only, and starts
without site-packages in a third of the CPU time.

A step killed with SIGKILL writes no end: its last tick says, to 0.1 s, until when it
ran. Each record is one `write` on an O_APPEND file (lines never interleave).
Concurrency is measured from these records, never from the daemon.
"""

import os
import sys
import time

TICK = 0.1


def record(log: str, kind: str, label: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {label} {time.time():.6f} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def main() -> int:
    log, label, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    record(log, "start", label)
    ends = time.monotonic() + seconds
    while (left := ends - time.monotonic()) > 0:
        time.sleep(min(TICK, left))
        record(log, "tick", label)
    record(log, "end", label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
