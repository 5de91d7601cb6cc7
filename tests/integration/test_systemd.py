"""sd_notify on real AF_UNIX datagram sockets, in process."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator

import anyio
import pytest

from dispatcher.systemd import Notifier, socket_address, watchdog_interval


def _drain(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock`, without blocking."""
    sock.setblocking(False)
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


@pytest.fixture
def path_socket() -> Iterator[tuple[str, socket.socket]]:
    with tempfile.TemporaryDirectory(prefix="dn-") as folder:
        path = os.path.join(folder, "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield path, sock


def test_messages_reach_a_path_socket(path_socket: tuple[str, socket.socket]) -> None:
    path, sock = path_socket
    notifier = Notifier(socket_address(path))
    notifier.ready(status="0 in flight")
    notifier.reloading()
    notifier.stopping()
    ready, reloading, stopping = _drain(sock)
    assert ready == "READY=1\nSTATUS=0 in flight"
    lines = reloading.splitlines()
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert int(value) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert stopping == "STOPPING=1"


def test_abstract_socket() -> None:
    name = f"@dispatcher-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": name})
        notifier.status("x" * 1000)
        (message,) = _drain(sock)
    assert message == "STATUS=" + "x" * 200


def test_from_environ_removes_the_variables_children_must_not_inherit() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environ(env)
    assert env == {}
    assert notifier.address == "/run/x" and notifier.watchdog_every == 1.0


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "2000000"})
    assert not notifier.enabled
    assert notifier.send(READY=1) is False
    notifier.ready()
    notifier.ping()


def test_a_missing_socket_is_one_warning_not_a_crash() -> None:
    notifier = Notifier("/nonexistent/notify.sock")
    assert notifier.send(READY=1) is False
    assert notifier.send(READY=1) is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "42"}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "43"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=42) == expected


async def _next_message(sock: socket.socket) -> str:
    sock.setblocking(False)
    return (await asyncio.get_running_loop().sock_recv(sock, 4096)).decode()


async def test_a_blocked_event_loop_stops_the_watchdog_pings(
    path_socket: tuple[str, socket.socket],
) -> None:
    path, sock = path_socket
    notifier = Notifier(socket_address(path), watchdog=0.02)
    async with anyio.create_task_group() as tg:
        tg.start_soon(notifier.watchdog_loop)
        with anyio.fail_after(30):
            assert await _next_message(sock) == "WATCHDOG=1"
            assert await _next_message(sock) == "WATCHDOG=1"
        _drain(sock)
        time.sleep(0.3)  # noqa: ASYNC251  # the point: the loop stalls for 15 ping periods
        assert _drain(sock) == []  # no ping came meanwhile (no thread pings for the loop)
        with anyio.fail_after(30):
            assert await _next_message(sock) == "WATCHDOG=1"  # the loop runs: pings again
        tg.cancel_scope.cancel()
