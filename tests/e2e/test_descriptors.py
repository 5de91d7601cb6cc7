"""Descriptors and connections: the daemon with few descriptors and many idle clients.

Once, 1,100 idle connections used up 1,024 descriptors: a dispatch failed for good with
"Too many open files", /healthz timed out and the log got 72,036 lines in 30 s.
"""

from __future__ import annotations

import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from .conftest import Daemon, wait_until
from .httphelp import api_url, call

pytestmark = pytest.mark.slow

WITH_LIMIT = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)
"""Runs the daemon with a given soft and hard limit of open descriptors."""


def config(idle_timeout: str = "60s", read_timeout: str = "30s") -> str:
    return f"""
[database]
path = "state/dispatcher.db"

[daemon]
poll_interval = "200ms"
shutdown_grace = "0s"

[runners.sh]
type = "exec"

[tasks.echo]
steps = [{{ name = "say", runner = "sh", args = ["echo", "{{word}}"] }}]

[api]
listen = "127.0.0.1:0"
idle_timeout = "{idle_timeout}"
read_timeout = "{read_timeout}"
"""


def limited(make_daemon: Any, soft: int, hard: int, **timeouts: str) -> Daemon:
    daemon: Daemon = make_daemon(config(**timeouts))
    daemon.launcher = [sys.executable, "-c", WITH_LIMIT, str(soft), str(hard)]
    daemon.start()
    return daemon


def port_of(daemon: Daemon) -> int:
    return int(api_url(daemon).rsplit(":", 1)[1])


def test_more_idle_connections_than_descriptors_do_not_stop_the_daemon(
    make_daemon: Any,
) -> None:
    daemon = limited(make_daemon, 256, 256)
    limit = daemon.wait_for_event("open_files_limit")
    assert (limit["soft"], limit["hard"]) == (256, 256)
    assert daemon.wait_for_event("api_started")["max_connections"] == 128  # half of 256
    port = port_of(daemon)
    started = time.monotonic()
    with ExitStack() as idle:
        for _ in range(600):  # idle: they connect and never send a byte
            idle.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(1)
        health = call("GET", f"http://127.0.0.1:{port}/healthz")
        assert health.status == 200
        result = daemon.cli("submit", "echo", "--param", "word=through", "--wait", "--json")
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert '"status": "succeeded"' in result.stdout
    took = time.monotonic() - started
    events = daemon.events()
    full = [e for e in events if e["event"] == "api_connections_full"]
    assert full and sum(e["closed_idle"] for e in full) >= 400
    assert len(full) <= took + 2  # at most a line a second, however many connections
    assert len(events) < 100  # against 72,036 lines in 30 s
    assert not [e for e in events if e["event"] == "api_accept_failed"]
    assert daemon.stop() == 0


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(make_daemon: Any) -> None:
    daemon = limited(make_daemon, 256, 4096)
    limit = daemon.wait_for_event("open_files_limit")
    assert (limit["soft"], limit["hard"], limit["raised_from"]) == (4096, 4096, 256)
    assert daemon.proc is not None
    limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines() if "open files" in line] == [
        ["4096", "4096"]
    ]
    assert daemon.wait_for_event("api_started")["max_connections"] == 1024  # the default
    assert daemon.stop() == 0


def closed_by_server(conn: socket.socket) -> bool:
    try:
        return conn.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_idle_and_trickling_connections_are_closed_after_idle_timeout(
    make_daemon: Any,
) -> None:
    daemon = limited(make_daemon, 1024, 1024, idle_timeout="1s")
    port = port_of(daemon)
    silent = socket.create_connection(("127.0.0.1", port), timeout=20)
    trickling = socket.create_connection(("127.0.0.1", port), timeout=20)
    with silent, trickling:
        trickling.settimeout(0.25)
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        closed = False
        for byte in head:  # a request head that never ends
            try:
                trickling.sendall(bytes([byte]))
                closed = closed_by_server(trickling)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
        assert closed, "a trickled request head kept its connection open"
        assert closed_by_server(silent)
    # a kept-alive connection, idle after its request
    with socket.create_connection(("127.0.0.1", port), timeout=20) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        wait_until(lambda: closed_by_server(kept), timeout=20)
    assert daemon.stop() == 0


def test_a_body_slower_than_read_timeout_is_answered_408_and_closed(make_daemon: Any) -> None:
    daemon = limited(make_daemon, 1024, 1024, read_timeout="1s")
    # Closed about a second after the answer: aiohttp's default would read on for 10 s
    # first, and the recv below would time out.
    with socket.create_connection(("127.0.0.1", port_of(daemon)), timeout=8) as slow:
        slow.sendall(
            b"POST /v1/dispatches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"task": "echo", '
        )  # and the rest never comes
        answer = b""
        while chunk := slow.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"code": "request_timeout"' in answer
    assert daemon.cli_json("list") == []
    assert daemon.stop() == 0
