"""The orphan guard: what a step started ends with the step, and steps die with the
daemon, even on SIGKILL.

It has two halves: this module, the daemon's side (`process_guard()`, used by
`dispatcher.runners.process`), and `guardian.py`, the small process it starts. One
guardian per daemon process, started with the daemon when its steps may start
processes (else on the first spawn), in a session of its own, reading a pipe from the
daemon. The daemon writes `+PGID` as soon as a step's group exists and `-PGID` once it has been
stopped and reaped. When the daemon is gone, whatever killed it, the kernel closes the
pipe; at that end of file the guardian SIGKILLs every registered group, then every
process whose environment carries this daemon's token (`DISPATCHER_GUARD=<token>`,
put into `os.environ` when the guard starts and into each step's environment), and
exits. The token closes the window between a fork and its `+PGID`, and reaches
grandchildren that left their group (setsid).

If the guardian dies while the daemon runs, a thread waiting for it (or the next
write, failing with EPIPE) starts a new one, registers the live groups again and logs
`guardian_restarted`. The pipe is non-blocking: a guardian that stops reading is
replaced rather than allowed to stall the event loop. Its end is close-on-exec, so no
step inherits it, and a child forked without exec (multiprocessing) closes it, so the
guardian sees the end of file when the daemon itself dies.

Each run of a step also carries a token of its own (`DISPATCHER_STEP_GUARD=<token>`). When
the step ends, however it ends (success, failure, timeout, cancel, drain), the daemon
kills its process group and writes `!TOKEN LABEL`: the guardian then kills every
process still carrying that token, those that left the group or the session (setsid,
double fork) included, while the daemon goes on.

A descriptor handed to `hold()` (the daemon's instance lock, on SQLite) is inherited by
every guardian, and by nothing else: a `flock` on it stays held while the guardian
lives, so after the daemon's death until its steps are gone.

Linux: the token scan reads /proc. Without /proc the registered groups are still
killed, and `guardian_degraded` says what is lost.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

from dispatcher import logs
from dispatcher.runners.orphan_guard import guardian

VARIABLE = guardian.VARIABLE
"""The environment variable that carries the token into steps."""

STEP_VARIABLE = guardian.STEP_VARIABLE
"""The environment variable that carries a step's own token (`step_token()`)."""

_RESTART_SPACING = 1.0
"""The watcher thread starts a guardian at most once a second (one that dies at once)."""

_log = logs.get_logger(__name__)


class GuardError(OSError):
    """The guardian could not be started: steps must not run unguarded."""


class OrphanGuard:
    """The guardian process of this daemon process, and the groups it watches.

    Thread-safe: the event loop registers groups; a watcher thread restarts a guardian
    that died. Nothing happens until `start()` (or the first `add`).
    """

    def __init__(self, token: str | None = None) -> None:
        self.token = token or secrets.token_hex(16)
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self._held = -1
        self._started_at = 0.0
        self._closed = False
        self._warned_no_proc = False

    @property
    def pid(self) -> int | None:
        """The current guardian's pid, None before the start."""
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def groups(self) -> frozenset[int]:
        """The registered process groups."""
        with self._lock:
            return frozenset(self._groups)

    def start(self) -> None:
        """Put the token into `os.environ` and start the guardian, once.

        Raises `GuardError` when the guardian cannot be started.
        """
        if self._proc is not None:
            return
        with self._lock:
            if self._proc is None:
                os.environ[VARIABLE] = self.token
                self._spawn()

    def hold(self, fd: int) -> None:
        """Hand a copy of `fd` to every guardian started from now on, one running now
        replaced (never to a step: the copy is close-on-exec here). Never raises."""
        copy = os.dup(fd)  # ours: the caller may close `fd` whenever it likes
        with self._lock:
            if self._held >= 0:
                os.close(self._held)
            self._held = copy
            if self._proc is None or self._closed:
                return
            self._stop()  # before its pipe closes: it does not take it for our death
            try:
                self._spawn()
            except GuardError as exc:  # the next step's spawn tries again
                _log.error("guardian_restart_failed", error=exc.strerror)

    def environment(self, env: Mapping[str, str], step: str | None = None) -> dict[str, str]:
        """`env` with this daemon's token, and the step's own token when given."""
        tokens = (
            {VARIABLE: self.token} if step is None else {VARIABLE: self.token, STEP_VARIABLE: step}
        )
        return {**env, **tokens}

    def add(self, pgid: int) -> None:
        """Register a started group (call right after the spawn, before any await).

        Raises `GuardError` when no guardian can be started: stop the group then.
        """
        with self._lock:
            self._groups.add(pgid)
            self._send(b"+%d\n" % pgid)

    def discard(self, pgid: int) -> None:
        """Forget a group once it has been stopped and reaped (never raises)."""
        with self._lock:
            if pgid not in self._groups:
                return
            self._groups.discard(pgid)
            try:
                self._send(b"-%d\n" % pgid)
            except GuardError as exc:
                _log.error("guardian_restart_failed", error=exc.strerror)

    def end_step(self, step: str, label: str = "") -> None:
        """A step is over: the guardian kills every process still carrying its token
        (whatever left the group or the session), now and off the event loop. Never
        raises; `label` (no spaces) names the step in the guardian's log line."""
        with self._lock:
            try:
                self._send(f"!{step} {label}\n".encode())
            except GuardError as exc:
                _log.error("guardian_restart_failed", error=exc.strerror)

    def lease(self, milliseconds: int) -> None:
        """The daemon's lease was renewed: unless renewed again within `milliseconds`,
        the guardian ends every step of this daemon (it is frozen or cut off, and
        another daemon may soon reap its work). 0: no deadline. Never raises; nothing
        happens before the guardian has started."""
        if self._proc is None:
            return
        with self._lock:
            try:
                self._send(b"~%d\n" % max(milliseconds, 0))
            except GuardError as exc:
                _log.error("guardian_restart_failed", error=exc.strerror)

    def close(self) -> None:
        """Close the pipe: the guardian kills what is still registered or carries the
        token, then exits. For a process that lives on after its steps (tests)."""
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _send(self, line: bytes) -> None:
        """Write one line; on a dead or stuck guardian, start a new one (which gets
        every group, this one included) and write the line to it. Lock held."""
        if self._closed:
            return
        if self._proc is None:
            self._spawn()
        else:
            try:
                os.write(self._fd, line)
                return
            except BrokenPipeError:
                self._restart("exited")
            except BlockingIOError:
                self._restart("not reading")
        try:  # a fresh pipe: room for this line (a +/- line is already applied)
            os.write(self._fd, line)
        except OSError as exc:
            _log.error("guardian_write_failed", error=exc.strerror)

    def _restart(self, reason: str) -> None:
        old = self._proc
        self._stop()
        self._spawn()
        returncode = old.poll() if old is not None else None
        _log.warning(
            "guardian_restarted",
            reason=reason,
            returncode=returncode,
            old_pid=old.pid if old is not None else None,
            pid=self.pid,
            groups=len(self._groups),
        )

    def _stop(self) -> None:
        """Drop the current guardian: killed *before* its pipe closes, so that it
        cannot take the end of file for the daemon's death."""
        if self._proc is not None:
            try:
                self._proc.kill()
            except OSError:
                pass
            self._proc = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _spawn(self) -> None:
        """Start a guardian and hand it every registered group. Lock held."""
        if not os.path.isdir("/proc/self") and not self._warned_no_proc:
            self._warned_no_proc = True
            _log.warning(
                "guardian_degraded",
                reason="no /proc: a step's grandchild that left its group, or a step "
                "started just before the daemon died, can outlive the daemon",
            )
        read_end, write_end = os.pipe()  # both close-on-exec
        env = {key: value for key, value in os.environ.items() if key != VARIABLE}
        try:
            if not sys.executable:
                raise GuardError(0, "cannot start the guardian: no Python executable")
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", guardian.__file__, self.token],
                stdin=read_end,
                pass_fds=(self._held,) if self._held >= 0 else (),
                env=env,
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:
            os.close(write_end)
            if isinstance(exc, GuardError):
                raise
            raise GuardError(exc.errno, f"cannot start the guardian: {exc.strerror}") from exc
        finally:
            os.close(read_end)
        if self._groups:
            # A fresh pipe has room for thousands of these lines: a blocking write.
            os.write(write_end, b"".join(b"+%d\n" % pgid for pgid in sorted(self._groups)))
        os.set_blocking(write_end, False)
        self._proc, self._fd, self._started_at = proc, write_end, time.monotonic()
        threading.Thread(
            target=self._watch, args=(proc,), name="guardian-watch", daemon=True
        ).start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for `proc` to exit; if it is still the guardian, start another."""
        proc.wait()
        time.sleep(max(0.0, self._started_at + _RESTART_SPACING - time.monotonic()))
        with self._lock:
            if self._proc is not proc or self._closed:
                return  # replaced meanwhile (a write saw EPIPE first), or closed
            try:
                self._restart("exited")
            except GuardError as exc:
                _log.error("guardian_restart_failed", error=exc.strerror)

    def _forget_after_fork(self) -> None:
        """In a child forked without exec: the daemon's guardian is not ours.

        Close our copy of the pipe (or the guardian would wait for this child too) and
        start from nothing with a new token if this child spawns steps itself.
        """
        for fd in (self._fd, self._held):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.__init__()  # type: ignore[misc]  # a fresh state, deliberately


_guard = OrphanGuard()
os.register_at_fork(after_in_child=lambda: _guard._forget_after_fork())


def process_guard() -> OrphanGuard:
    """This process's guard."""
    return _guard


def step_token() -> str:
    """A new token for one run of a step (see `OrphanGuard.end_step`)."""
    return secrets.token_hex(16)
