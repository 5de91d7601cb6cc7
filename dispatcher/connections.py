"""The HTTP API's TCP connections: accepted here, capped, and closed when idle.

The API accepts its connections itself (not with `loop.create_server`) and hands each
one to aiohttp with `loop.connect_accepted_socket`, so that:

- at most `max_connections` are open at once. At the cap, the connection idle the
  longest (no request in progress) is closed to make room; if every connection has a
  request in progress, accepting waits (new ones wait in the kernel's backlog, taking
  no descriptor of ours). Idle connections therefore cannot lock out `/healthz`.
- a connection idle for `idle_timeout` is closed: one that sends nothing after
  connecting, one that trickles its request head, one kept alive between requests.
- an accept error (EMFILE, ENFILE, ENOBUFS, ENOMEM) closes the longest-idle connection
  and retries (after a short pause when none is idle); it is logged at most once a
  second, with the count since the last line (`api_accept_failed`). asyncio's own
  accept loop logs every failure, up to its backlog times per wake-up, and re-arms
  itself as often: 72,036 lines in 30 s with 1,100 idle connections.
- closing idle connections at the cap is logged the same way (`api_connections_full`).

Only the event loop touches this state.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from dispatcher import logs

RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Accept errors that mean "out of a resource": an idle connection is closed to give a
descriptor back. Any other accept error is logged the same way and tried again."""

ACCEPT_PAUSE = 0.1
"""Seconds between two tries after an accept error."""

LOG_EVERY = 1.0
"""At most one `api_accept_failed` line per this many seconds."""

BACKLOG = 128

_log = logs.get_logger("dispatcher.api")


@dataclass(eq=False, slots=True)
class Connection:
    """One accepted connection: when it was last idle, and how many requests it runs."""

    transport: asyncio.BaseTransport
    idle_since: float
    busy: int = 0


@dataclass
class Throttle:
    """Counts events and says when to log them: at most once per `every` seconds, each
    line with the count since the last one; nothing is lost (see `flush`)."""

    every: float = LOG_EVERY
    pending: int = 0
    next_at: float = float("-inf")

    def count(self, now: float) -> int:
        """Count one event; how many to log now (0: not yet)."""
        self.pending += 1
        return self.flush(now)

    def flush(self, now: float) -> int:
        """The events not yet logged, if a line is due now (else 0)."""
        if not self.pending or now < self.next_at:
            return 0
        count, self.pending, self.next_at = self.pending, 0, now + self.every
        return count


@dataclass
class ConnectionLimiter:
    """The open connections of the API and the rules above; `clock` is the loop's time."""

    max_connections: int
    idle_timeout: float
    clock: Callable[[], float]
    open: dict[asyncio.BaseTransport, Connection] = field(default_factory=dict)
    room: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, transport: asyncio.BaseTransport) -> None:
        self.open[transport] = Connection(transport, self.clock())

    def request_started(self, transport: Any) -> None:
        connection = self.open.get(transport)
        if connection is not None:
            connection.busy += 1

    def request_finished(self, transport: Any) -> None:
        connection = self.open.get(transport)
        if connection is not None:
            connection.busy -= 1
            connection.idle_since = self.clock()
            if connection.busy == 0:
                self.room.set()

    def prune(self) -> None:
        """Forget the connections that are closed or closing."""
        for transport in [t for t in self.open if t.is_closing()]:
            del self.open[transport]

    def close_idle(self) -> int:
        """Close every connection idle longer than `idle_timeout`; how many."""
        deadline = self.clock() - self.idle_timeout
        stale = [c for c in self.open.values() if c.busy == 0 and c.idle_since <= deadline]
        for connection in stale:
            self._close(connection)
        return len(stale)

    def close_longest_idle(self) -> bool:
        """Close the connection idle the longest, if any is idle; whether one was."""
        idle = [c for c in self.open.values() if c.busy == 0]
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.idle_since))
        return True

    def make_room(self) -> bool:
        """Below the cap, or brought below it by closing an idle connection?"""
        self.prune()
        if len(self.open) < self.max_connections:
            return True
        return self.close_longest_idle()

    def _close(self, connection: Connection) -> None:
        connection.transport.close()
        self.open.pop(connection.transport, None)


class Acceptor:
    """Accepts on listening sockets and hands each connection to `protocol_factory`."""

    def __init__(
        self,
        sockets: Iterable[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
        limiter: ConnectionLimiter,
    ) -> None:
        self.sockets = list(sockets)
        self._factory = protocol_factory
        self.limiter = limiter
        self._failures = Throttle()
        self._evictions = Throttle()
        self._error = ""

    async def serve(self) -> None:
        """Accept on every socket and close idle connections, until cancelled."""
        async with anyio.create_task_group() as tg:
            for sock in self.sockets:
                tg.start_soon(self._accept_loop, sock)
            tg.start_soon(self._sweep_loop)

    async def _sweep_loop(self) -> None:
        period = max(min(self.limiter.idle_timeout / 4, LOG_EVERY), 0.05)
        while True:
            await anyio.sleep(period)
            self.limiter.prune()
            self.limiter.close_idle()
            now = self.limiter.clock()
            self._log_failures(self._failures.flush(now))
            self._log_evictions(self._evictions.flush(now))

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._room()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # never the end of the API: log (throttled), go on
                await self._accept_failed(exc)
                continue
            await self._hand_over(loop, conn)

    async def _room(self) -> None:
        """Return once a new connection may be accepted (closing an idle one if needed)."""
        while True:
            self.limiter.prune()
            full = len(self.limiter.open) >= self.limiter.max_connections
            if self.limiter.make_room():
                if full:
                    self._log_evictions(self._evictions.count(self.limiter.clock()))
                return
            self.limiter.room.clear()  # every connection has a request in progress
            with anyio.move_on_after(1.0):
                await self.limiter.room.wait()

    async def _hand_over(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            transport, _ = await loop.connect_accepted_socket(self._factory, conn)
        except OSError:  # the peer went away already
            conn.close()
            return
        except BaseException:  # cancelled with the API: no descriptor left behind
            conn.close()
            raise
        self.limiter.add(transport)

    async def _accept_failed(self, exc: OSError) -> None:
        self._error = exc.strerror or str(exc)
        self._log_failures(self._failures.count(self.limiter.clock()))
        if exc.errno in RESOURCE_ERRNOS and self.limiter.close_longest_idle():
            await anyio.lowlevel.checkpoint()  # the loop's next round closes its descriptor
        else:
            await anyio.sleep(ACCEPT_PAUSE)  # nothing to give back (or another error)

    def _log_failures(self, count: int) -> None:
        if count:
            _log.warning(
                "api_accept_failed",
                error=self._error,
                failures=count,
                connections=len(self.limiter.open),
            )

    def _log_evictions(self, count: int) -> None:
        if count:
            _log.warning(
                "api_connections_full",
                closed_idle=count,
                max_connections=self.limiter.max_connections,
            )


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for `host:port` (each address it names).

    `OSError` when one cannot be made. Port 0 picks one port, shared by all addresses.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((info[0], info[4]) for info in infos))
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            if sockets and port == 0:  # the same free port on every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def connection_cap(configured: int) -> int:
    """`configured`, but at most half the descriptors this process may open: the other
    half stays for the database, the steps' pipes and the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft // 2))
