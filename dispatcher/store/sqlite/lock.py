"""The instance lock: one daemon per SQLite file.

Several daemons on one SQLite file would each believe they own every `global` place
and recover each other's work; an exclusive `flock` on `<database>.lock`, taken before
the store opens and held until it is closed, keeps a second one out. (On PostgreSQL
daemons share the database under leases instead: `dispatcher.lease`.)

The daemon hands the lock's descriptor to its guardian (`OrphanGuard.hold`), and a
`flock` belongs to the open file, not to a process: when the daemon is killed, the
lock stays held until its guardian has killed the daemon's steps and exited. A new
daemon finding the lock held while the pid written in it is dead waits for it (up to
`patience`): no step of the dead daemon runs beside its own steps.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from dispatcher import logs
from dispatcher.errors import StoreError, Unavailable

PATIENCE = 10.0
"""Seconds a new daemon waits for a dead daemon's guardian to finish its sweep."""

_POLL = 0.03

_log = logs.get_logger(__name__)


class InstanceLock:
    """An exclusive `flock` on `<database>.lock`: one daemon per database."""

    def __init__(self, db_path: Path, patience: float = PATIENCE) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self.patience = patience
        self._handle: IO[str] | None = None

    def fileno(self) -> int | None:
        """The descriptor that holds the lock (None when not held)."""
        return self._handle.fileno() if self._handle is not None else None

    def acquire(self) -> None:
        """Take the lock, waiting while the daemon that holds it is dead (its guardian
        is still at work); `Unavailable` at once when that daemon is alive."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")
        except OSError as exc:  # e.g. a read-only folder: one line, exit 73, no traceback
            raise StoreError(
                f"cannot open database {self.path.with_suffix('')}: cannot open lock file "
                f"{self.path}: {exc.strerror or exc}"
            ) from None
        try:
            self._wait_for(handle)
        except BaseException:
            handle.close()
            raise
        self._handle = handle
        self._write_pid(handle.fileno())

    def _write_pid(self, fd: int) -> None:
        """Our pid in the file, for the next daemon to tell a dead holder from a live
        one. A hint only: the lock is the `flock`, held already. On a full disk the
        file stays empty (a next daemon then fails at once instead of waiting for our
        guardian), which is no reason to refuse to start. Unbuffered: nothing is left
        to fail again at the close."""
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            _log.warning(
                "instance_lock_pid_unwritten", lock=str(self.path), error=exc.strerror or str(exc)
            )

    def _wait_for(self, handle: IO[str]) -> None:
        """Lock `handle`: at once, or once a dead holder's descriptors are all closed."""
        deadline: float | None = None
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            handle.seek(0)
            holder = handle.read().strip()
            if not _dead(holder):
                raise Unavailable(
                    f"another dispatcher daemon (pid {holder or 'unknown'}) is running on "
                    f"{self.path.with_suffix('')} (lock {self.path} is held)"
                )
            if deadline is None:
                deadline = time.monotonic() + self.patience
                _log.info(
                    "instance_lock_waiting",
                    holder_pid=int(holder),
                    lock=str(self.path),
                    reason="the daemon that held it is gone; its guardian is ending its steps",
                )
                logs.flush()  # seen while we wait: the daemon's flush loop is not running yet
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"lock {self.path} is still held after {self.patience:g}s, though the "
                    f"daemon that took it (pid {holder}) is gone: its guardian or a process "
                    "that inherited the lock is still running"
                )
            time.sleep(_POLL)

    def release(self) -> None:
        """Unlock (for the guardian's copy of the descriptor too) and close."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _dead(pid_text: str) -> bool:
    """Whether the process named in the lock file has ended (a zombie has: it runs no
    more). Not a pid (an empty file, being written): not known to be dead."""
    if not pid_text.isdigit() or int(pid_text) <= 0:
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True  # reaped meanwhile
    except (OSError, IndexError):
        return False  # no /proc: a zombie looks alive
