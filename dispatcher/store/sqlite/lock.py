"""The instance lock: one daemon per SQLite file.

Several daemons on one SQLite file would each believe they own every `global` place
and recover each other's work; an exclusive `flock` on `<database>.lock`, taken before
the store opens and held until it is closed, keeps a second one out. (On PostgreSQL
daemons share the database under leases instead: `dispatcher.lease`.)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import IO

from dispatcher.errors import StoreError, Unavailable


class InstanceLock:
    """An exclusive `flock` on `<database>.lock`: one daemon per database."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")
        except OSError as exc:  # e.g. a read-only folder: one line, exit 73, no traceback
            raise StoreError(
                f"cannot open database {self.path.with_suffix('')}: cannot open lock file "
                f"{self.path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise Unavailable(
                f"another dispatcher daemon (pid {holder}) is running on "
                f"{self.path.with_suffix('')} (lock {self.path} is held)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
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
