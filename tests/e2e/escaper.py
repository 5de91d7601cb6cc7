"""A step that leaves a process behind, out of its reach: the e2e tests' escapee.

usage: escaper.py PIDFILE THEN     THEN: exit | fail | sleep

It double-forks a grandchild that calls setsid (a session and group of its own,
reparented away from the step) and drops the daemon's token from its environment, so
only the step's own token (`DISPATCHER_STEP_GUARD`) still marks it. The grandchild writes
its pid to PIDFILE and sleeps; the step waits for that file, then exits 0, exits 1 or
sleeps.
"""

import os
import sys
import time


def leave_a_grandchild(pidfile: str) -> None:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            env = {k: v for k, v in os.environ.items() if k != "DISPATCHER_GUARD"}
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            script = f'echo $$ > "{pidfile}.tmp" && mv "{pidfile}.tmp" "{pidfile}"; exec sleep 300'
            os.execve("/bin/sh", ["sh", "-c", script], env)
        os._exit(0)
    os.wait()
    while not os.path.exists(pidfile):
        time.sleep(0.01)


def main() -> int:
    pidfile, then = sys.argv[1], sys.argv[2]
    leave_a_grandchild(pidfile)
    if then == "sleep":
        time.sleep(300)
    return 1 if then == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())
