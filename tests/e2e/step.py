"""A step for the e2e tests: records its own start and end times, then exits.

usage: step.py LOG LABEL SECONDS [EXIT_CODE]

The tests run it with `python -S`: it needs the standard library only, and starts
without site-packages in a third of the CPU time.

Each record is one `write` on an O_APPEND file, so lines from concurrent steps never
interleave. Concurrency is measured from these records, never from the daemon.
"""

import os
import sys
import time


def record(log: str, kind: str, label: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {label} {time.time():.6f} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def main() -> int:
    log, label, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    code = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    record(log, "start", label)
    time.sleep(seconds)
    record(log, "end", label)
    return code


if __name__ == "__main__":
    sys.exit(main())
