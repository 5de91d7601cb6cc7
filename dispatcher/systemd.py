"""The systemd notification protocol (sd_notify), written by hand: no dependency.

A service of `Type=notify` tells systemd how it is doing by sending datagrams such as
`READY=1` or `WATCHDOG=1` to the AF_UNIX socket named in `$NOTIFY_SOCKET` (a path, or
an abstract name written with a leading `@`). Without that variable every call here
does nothing, so the daemon runs the same in a terminal, in Docker and under systemd.

The watchdog pings come from a task on the daemon's own event loop, never from a
thread: if the loop stalls, the pings stop and systemd restarts the service.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping

import anyio

from dispatcher import logs

log = logs.get_logger("dispatcher.systemd")

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
MAX_STATUS = 200
"""systemctl shows one line of STATUS=; keep it short."""


def socket_address(name: str) -> str:
    """`$NOTIFY_SOCKET` as a `socket` address: `@name` is the abstract `\\0name`."""
    return "\0" + name[1:] if name.startswith("@") else name


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two pings (half of `WATCHDOG_USEC`), or None when not asked for.

    `WATCHDOG_PID`, when set, names the process that must ping; another process
    (a child that inherited the environment) must not.
    """
    usec = environ.get(ENV_WATCHDOG_USEC, "")
    owner = environ.get(ENV_WATCHDOG_PID, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2 / 1_000_000


class Notifier:
    """Sends notifications to systemd; every method is a no-op when disabled.

    Sending never blocks the event loop and never raises: a full or vanished socket
    costs one logged warning, not the daemon.
    """

    def __init__(self, address: str | None = None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog_every = watchdog
        self._warned = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read and *remove* the variables, so that step processes never inherit them."""
        env = os.environ if environ is None else environ
        name = env.get(ENV_SOCKET) or None
        watchdog = watchdog_interval(env, os.getpid())
        for key in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
            env.pop(key, None)
        return cls(socket_address(name) if name else None, watchdog)

    @property
    def enabled(self) -> bool:
        """Whether `$NOTIFY_SOCKET` was set (else every call does nothing)."""
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send `KEY=value` lines in one datagram; True when it was sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("notify_failed", socket=self.address, error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """The daemon has recovered its state and accepts work."""
        self._send_with_status(status, READY=1)

    def reloading(self) -> None:
        """A reload starts; `ready()` must follow when it is done (or refused)."""
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str | None = None) -> None:
        """Shutdown has begun."""
        self._send_with_status(status, STOPPING=1)

    def status(self, text: str) -> None:
        """One short line for `systemctl status`."""
        self.send(STATUS=text[:MAX_STATUS])

    def ping(self) -> None:
        """Tell the watchdog that the daemon is alive."""
        self.send(WATCHDOG=1)

    def _send_with_status(self, status: str | None, **fields: str | int) -> None:
        if status is not None:
            fields["STATUS"] = status[:MAX_STATUS]
        self.send(**fields)

    async def watchdog_loop(self) -> None:
        """Ping at half of `WATCHDOG_USEC`, from the event loop, for ever (if asked to)."""
        if self.address is None or self.watchdog_every is None:
            return
        while True:
            self.ping()
            await anyio.sleep(self.watchdog_every)

    async def status_loop(self, summary: Callable[[], Awaitable[str]], every: float) -> None:
        """Refresh STATUS= with `summary()` every `every` seconds (if enabled)."""
        if self.address is None:
            return
        while True:
            await anyio.sleep(every)
            self.status(await summary())
