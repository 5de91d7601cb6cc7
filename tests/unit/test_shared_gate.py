"""The gate on a shared store: two daemons' gates on one database share the caps."""

from __future__ import annotations

import asyncio

from dispatcher.gate import ConcurrencyGate
from dispatcher.testing import FakeClock, InMemoryStore


class SharedMemoryStore(InMemoryStore):
    """The in-memory store posing as a database several daemons share."""

    shared = True


def two_gates(store: InMemoryStore) -> tuple[ConcurrencyGate, ConcurrencyGate]:
    caps = {"global": 3, "runner:shell": 2}
    clock = FakeClock()
    return (
        ConcurrencyGate(store, clock, "a", caps, poll_interval=0.01),
        ConcurrencyGate(store, clock, "b", caps, poll_interval=0.01),
    )


def held(store: InMemoryStore, gate: str) -> int:
    return sum(1 for r in store.slots.values() if r.gate == gate and r.released_at is None)


async def test_a_runner_cap_holds_across_daemons_and_waiters_get_freed_places() -> None:
    store = SharedMemoryStore()
    a, b = two_gates(store)
    first = await a.acquire("runner:shell", "a1")
    second = await b.acquire("runner:shell", "b1")
    waiter = asyncio.create_task(a.acquire("runner:shell", "a2"))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # `a` has a free local place, but the database is full
    assert held(store, "runner:shell") == 2

    await b.release(second)
    b.db_changed()
    a.db_changed()  # what the NOTIFY of the released row does
    third = await asyncio.wait_for(waiter, 5)
    assert held(store, "runner:shell") == 2
    for slot in (first, third):
        await a.release(slot)
    assert held(store, "runner:shell") == 0


async def test_room_and_try_bind_count_every_daemons_global_places() -> None:
    store = SharedMemoryStore()
    a, b = two_gates(store)
    for n in range(2):
        await b.wait_free("global")
        assert await b.try_bind("global", f"b{n}") is not None
    assert await a.room("global") == 1
    await a.wait_free("global")
    assert await a.try_bind("global", "a0") is not None
    await a.wait_free("global")
    assert await a.try_bind("global", "a1") is None  # refused: 3 held across daemons
    assert a.held("global") == 1


async def test_an_unshared_store_keeps_the_local_path() -> None:
    store = InMemoryStore()
    a, _ = two_gates(store)
    assert await a.room("global") > 1000
    await a.wait_free("global")
    assert await a.try_bind("global", "x") is not None
