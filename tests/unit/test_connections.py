"""The API's connection rules, on fake transports and a fake clock."""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.connections import ConnectionLimiter, Throttle


@dataclass(eq=False)
class FakeTransport:
    closed: bool = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def limiter(
    max_connections: int = 3, idle_timeout: float = 10.0
) -> tuple[ConnectionLimiter, Clock]:
    clock = Clock()
    return ConnectionLimiter(max_connections, idle_timeout, clock), clock


def connect(limits: ConnectionLimiter, clock: Clock, count: int) -> list[FakeTransport]:
    transports = []
    for _ in range(count):
        transport = FakeTransport()
        limits.add(transport)  # type: ignore[arg-type]  # a transport's two methods suffice
        transports.append(transport)
        clock.now += 1
    return transports


def test_the_throttle_logs_at_most_once_a_second_and_loses_no_count() -> None:
    throttle = Throttle(every=1.0)
    logged = [throttle.count(t / 1000) for t in range(0, 2500)]  # 1000 failures a second
    assert [count for count in logged if count] == [1, 1000, 1000]
    assert throttle.flush(2.4) == 0  # the next line is not due yet
    assert throttle.flush(3.0) == 499  # the rest, once due
    assert throttle.flush(9.0) == 0


def test_below_the_cap_there_is_room_without_closing_anything() -> None:
    limits, clock = limiter()
    transports = connect(limits, clock, 2)
    assert limits.make_room()
    assert not any(t.closed for t in transports)


def test_at_the_cap_the_longest_idle_connection_makes_room() -> None:
    limits, clock = limiter()
    first, second, third = connect(limits, clock, 3)
    limits.request_started(first)  # busy: not a candidate, though the oldest
    assert limits.make_room()
    assert (first.closed, second.closed, third.closed) == (False, True, False)
    assert len(limits.open) == 2


def test_a_connection_idle_since_its_last_request_counts_from_then() -> None:
    limits, clock = limiter()
    first, second, _third = connect(limits, clock, 3)
    limits.request_started(first)
    clock.now += 5
    limits.request_finished(first)  # now the most recently idle
    assert limits.make_room()
    assert (first.closed, second.closed) == (False, True)


def test_when_every_connection_is_busy_there_is_no_room() -> None:
    limits, clock = limiter()
    transports = connect(limits, clock, 3)
    for transport in transports:
        limits.request_started(transport)
    assert not limits.make_room()
    assert not any(t.closed for t in transports)
    limits.request_finished(transports[1])
    assert limits.room.is_set()
    assert limits.make_room() and transports[1].closed


def test_closed_connections_leave_room() -> None:
    limits, clock = limiter()
    transports = connect(limits, clock, 3)
    for transport in transports:
        limits.request_started(transport)
    transports[0].close()  # the peer went away, or aiohttp closed it
    assert limits.make_room()
    assert len(limits.open) == 2


def test_idle_connections_are_closed_after_the_idle_timeout_busy_ones_never() -> None:
    limits, clock = limiter(max_connections=10, idle_timeout=10.0)
    quiet, working, recent = connect(limits, clock, 3)  # at 0, 1, 2
    limits.request_started(working)
    clock.now = 11.5
    assert limits.close_idle() == 1
    assert (quiet.closed, working.closed, recent.closed) == (True, False, False)
    clock.now = 60
    assert limits.close_idle() == 1 and recent.closed and not working.closed
