"""`LISTEN` on a dedicated connection: wake-ups from other processes, kept alive.

A dispatch inserted or asked to cancel (channel `dispatcher_dispatches`) or a gate row
released (`dispatcher_gates`), by any process, calls `on_change`. Polling stays the
fallback: a lost listening connection only delays wake-ups until it is back (it is
opened again at once, then with a backoff; `on_change` is then called for whatever was
notified meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg

from dispatcher import logs
from dispatcher.errors import DispatcherError

log = logs.get_logger("dispatcher.store.postgres")

CHANNELS = ("dispatcher_dispatches", "dispatcher_gates")
"""NOTIFY channels: a dispatch was inserted or asked to cancel; a gate row was released."""

RELISTEN_FIRST = 0.5
RELISTEN_MAX = 30.0
"""Backoff between tries to listen again after the listening connection was lost
(the first try is at once)."""


CANCEL = "cancel"
"""The payload of a cancel request on `dispatcher_dispatches` (migration 0022)."""


class Listener:
    """One listening connection for a store; see the module docstring.

    `on_cancel` (a cancel request) and `on_released` (gate rows released) are called
    instead of `on_change` for those notifications when given. PostgreSQL sends one
    notification per channel and payload per transaction, so a batch of writes is one
    wake-up.
    """

    def __init__(
        self,
        url: str,
        database: str,
        on_change: Callable[[], None],
        *,
        on_cancel: Callable[[], None] | None = None,
        on_released: Callable[[], None] | None = None,
    ) -> None:
        self._url = url
        self._database = database
        self._on_change = on_change
        self._on_cancel = on_cancel or on_change
        self._on_released = on_released or on_change
        self._connection: Any = None
        self._relisten: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Connect and listen; raises the driver's error when it cannot."""
        connection = await asyncpg.connect(self._url)
        try:
            await connection.add_listener(CHANNELS[0], self._dispatches)
            await connection.add_listener(CHANNELS[1], lambda *_: self._on_released())
        except BaseException:
            connection.terminate()
            raise
        connection.add_termination_listener(self._lost)
        self._connection = connection

    def _dispatches(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload == CANCEL:
            self._on_cancel()
        else:
            self._on_change()

    def server_pid(self) -> int | None:
        """The PostgreSQL backend of the listening connection (None: not connected)."""
        return None if self._connection is None else int(self._connection.get_server_pid())

    async def close(self) -> None:
        """Stop listening; idempotent."""
        self._closed = True
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(BaseException):
                await self._relisten
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    def _lost(self, _connection: Any) -> None:
        """The listening connection closed: reconnect, unless we closed it."""
        if self._closed or self._relisten is not None:
            return
        log.warning("listen_lost", database=self._database, fallback="polling")
        self._relisten = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        delay = 0.0
        try:
            while not self._closed:
                await asyncio.sleep(delay)
                delay = min(max(delay * 2, RELISTEN_FIRST), RELISTEN_MAX)
                try:
                    await self.start()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                    continue
                except DispatcherError:
                    continue
                log.info("listen_restored", database=self._database)
                self._on_change()  # what was notified while nobody listened
                return
        finally:
            self._relisten = None
