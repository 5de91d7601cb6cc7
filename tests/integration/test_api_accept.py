"""The API's acceptor when descriptors run out: bounded log, and it still accepts.

A child process serves a trivial protocol through `Acceptor` with no connection cap and
64 descriptors; the test opens many more connections than that and keeps them open.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest

pytestmark = pytest.mark.slow

SERVER = """\
import asyncio, json, resource, sys
from dispatcher import logs
from dispatcher.connections import Acceptor, ConnectionLimiter, listening_sockets

class Hello(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(b"hi\\n")

async def main():
    logs.configure("info", "json")
    loop = asyncio.get_running_loop()
    sockets = listening_sockets("127.0.0.1", 0)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    limiter = ConnectionLimiter(100_000, 60.0, loop.time)  # no cap: descriptors run out
    serving = asyncio.ensure_future(Acceptor(sockets, Hello, limiter).serve())
    print(json.dumps({"port": sockets[0].getsockname()[1]}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    serving.cancel()

asyncio.run(main())
"""


def hello(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        return conn.recv(16)


def test_out_of_descriptors_the_acceptor_logs_once_a_second_and_still_serves() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as server:
        assert server.stdin is not None and server.stdout is not None
        try:
            port = json.loads(server.stdout.readline())["port"]
            started = time.monotonic()
            with ExitStack() as idle:
                for _ in range(300):  # far more than 64: the kernel's backlog holds the rest
                    idle.enter_context(socket.create_connection(("127.0.0.1", port)))
                time.sleep(2)  # let it run out of descriptors for a while
                assert hello(port) == b"hi\n"  # idle connections made room for this one
            server.stdin.close()
            output = server.stdout.read()
            took = time.monotonic() - started
        finally:
            server.kill()
    events = [json.loads(line) for line in output.splitlines()]
    failures = [e for e in events if e["event"] == "api_accept_failed"]
    assert failures, output[-2000:]
    assert failures[0]["error"] == "Too many open files"
    assert len(failures) <= took + 2  # at most one line a second
    assert sum(e["failures"] for e in failures) >= 200  # each line counts many
    assert [e for e in events if e["event"] != "api_accept_failed"] == []
