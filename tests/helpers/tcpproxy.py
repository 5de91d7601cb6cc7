"""A TCP proxy for tests that cut a daemon off its database and let it back.

`TcpProxy(target_host, target_port)` listens on 127.0.0.1 (an ephemeral port) and
forwards each connection. `cut()` drops every open connection and makes new ones hang
(accepted, never forwarded), as a network partition does; `restore()` forwards again.
It runs its own event loop in a thread, so the test's code stays synchronous.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()  # set: forwarding; clear: a partition
        self._pipes: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._call(self._start())
        self.restore()

    def _call(self, coro: object) -> int:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await self._open.wait()  # in a partition the connection is made, then nothing
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            try:
                await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._pipes.discard(task)

    def cut(self) -> None:
        """Drop every connection; new ones hang until `restore`."""

        async def cut() -> int:
            self._open.clear()
            for task in list(self._pipes):
                task.cancel()
            return 0

        self._call(cut())

    def restore(self) -> None:
        async def restore() -> int:
            self._open.set()
            return 0

        self._call(restore())

    def close(self) -> None:
        async def close() -> int:
            if self._server is not None:
                self._server.close()
            pipes = list(self._pipes)
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()
            return 0

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@contextmanager
def proxy(host: str, port: int) -> Iterator[TcpProxy]:
    """A `TcpProxy`, closed afterwards."""
    made = TcpProxy(host, port)
    try:
        yield made
    finally:
        made.close()
