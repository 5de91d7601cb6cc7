"""Wake-ups across processes on one SQLite database: a datagram instead of a poll.

SQLite has no `LISTEN/NOTIFY`, so a daemon would see a dispatch submitted by another
process (the CLI) only at its next poll. Instead the daemon binds a datagram socket in
Linux's abstract namespace, named after its database file; a process that has just
committed a submission sends it one byte, and the daemon claims at once.

The name is made from the file's identity, its device and inode, not its path: daemons
in containers that share the host's network namespace all have a
`/var/lib/dispatcher/dispatcher.db`, but each its own file, so each its own socket (a
name made from the path would let one daemon take the name and the others fall back
to polling, or wake each other for nothing). Any path to the same file gives the same
name, the CLI beside the daemon's included.

Nothing depends on it: a lost datagram, a sender in another network namespace (the
host, against a daemon in a container), a name already taken or a platform without
abstract sockets all leave the daemon to its `poll_interval`, as before. The socket
is no file: nothing to clean up, nothing left stale by a SIGKILL, no path length
limit. Anyone who can reach it (any local process in the network namespace) can only
make the daemon look for work early, and at most once per `MIN_SPACING`: a flood of
datagrams costs the daemon a few empty claims a second, not a busy loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

_MAX_READS = 64
"""Datagrams drained per wake-up of the reader (each is a byte; all mean the same)."""

MIN_SPACING = 0.01
"""Seconds between two calls of `on_wake`; datagrams in between make one more call."""


def address(database: Path) -> str:
    """The socket's name for a database file: its device and inode, so the same for
    every path to it and different for another file at the same path. (A file that
    does not exist yet is named by its real path.)"""
    try:
        stat = os.stat(database)
        identity = f"{stat.st_dev}:{stat.st_ino}".encode()
    except OSError:
        identity = os.fsencode(database.resolve())
    digest = hashlib.sha256(identity).hexdigest()[:40]
    return f"\0dispatcher-wake/{digest}"


def send(database: Path) -> None:
    """Tell the daemon on `database`, if one listens, that there is new work; never
    raises and never blocks."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(b"!", address(database))
    except OSError:  # no daemon (ECONNREFUSED), a full queue (EAGAIN), no AF_UNIX
        pass


class Listener:
    """The daemon's end: calls `on_wake` on the event loop when datagrams arrive, at most
    once per `MIN_SPACING`."""

    def __init__(self, database: Path, on_wake: Callable[[], None]) -> None:
        self._database = database
        self._on_wake = on_wake
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = float("-inf")
        self._later: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Bind and watch the socket; raises OSError if that cannot be done."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(address(self._database))
            loop = asyncio.get_running_loop()
            loop.add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, loop

    def close(self) -> None:
        """Stop listening (idempotent)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        sock.close()

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(_MAX_READS):
            try:
                sock.recv(16)
            except OSError:  # BlockingIOError: drained
                break
        if self._later is not None or self._loop is None:
            return  # a call is already due
        wait = self._last + MIN_SPACING - self._loop.time()
        if wait <= 0:
            self._wake()
        else:
            self._later = self._loop.call_later(wait, self._wake)

    def _wake(self) -> None:
        self._later = None
        if self._loop is not None:
            self._last = self._loop.time()
        self._on_wake()
