"""ConcurrencyGate on the in-memory store: FIFO, exactly-once release, mirror rows."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from dispatcher.config import Settings
from dispatcher.gate import (
    GLOBAL,
    ConcurrencyGate,
    FifoSemaphore,
    GateKind,
    GateName,
    dispatch_holder,
    gate_capacities,
    gate_capacity,
    held_by_step,
    runner_gate,
    step_holder,
    task_gate,
    task_gate_key,
)
from dispatcher.testing import FakeClock, InMemoryStore


def make_gate(store: InMemoryStore, **caps: int) -> ConcurrencyGate:
    capacities = {"global": caps.pop("global_", 2), **caps}
    return ConcurrencyGate(
        store,
        FakeClock(),
        "inst",
        capacities,
        on_demand=lambda name: 1 if name.startswith("task:") else None,
    )


def held_rows(store: InMemoryStore) -> list[str]:
    return sorted(row.holder for row in store.slots.values() if row.released_at is None)


async def test_fifo_waiters_are_served_in_arrival_order() -> None:
    sem = FifoSemaphore(1)
    await sem.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await sem.acquire()
        order.append(n)

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(waiter(n)))
        await asyncio.sleep(0)
    for _ in range(5):
        sem.release()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_cancelled_waiter_does_not_leak_a_place() -> None:
    sem = FifoSemaphore(1)
    await sem.acquire()
    task = asyncio.create_task(sem.acquire())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    sem.release()
    assert sem.held == 0
    assert sem.try_acquire()


async def test_grant_and_cancel_in_same_tick_passes_the_place_on() -> None:
    sem = FifoSemaphore(1)
    await sem.acquire()
    first = asyncio.create_task(sem.acquire())
    second = asyncio.create_task(sem.acquire())
    await asyncio.sleep(0)
    sem.release()  # grants `first` ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)
    assert sem.held == 1


async def test_capacity_is_never_exceeded_and_rows_mirror_holders() -> None:
    store = InMemoryStore()
    gate = make_gate(store, global_=3)
    running = 0
    peak = 0

    async def work(n: int) -> None:
        nonlocal running, peak
        async with gate.hold("global", f"dispatch:{n}"):
            running += 1
            peak = max(peak, running)
            assert len(held_rows(store)) == running
            await asyncio.sleep(0.001)
            running -= 1

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(work, n)
    assert peak == 3
    assert held_rows(store) == []
    assert len(store.slots) == 20  # one row per acquire, each released


async def test_release_is_exactly_once() -> None:
    store = InMemoryStore()
    gate = make_gate(store)
    slot = await gate.acquire("global", "dispatch:1")
    await gate.release(slot)
    await gate.release(slot)
    assert gate.held("global") == 0
    assert held_rows(store) == []


async def test_release_completes_inside_a_cancelled_scope() -> None:
    store = InMemoryStore()
    gate = make_gate(store)
    with anyio.CancelScope() as scope:
        async with gate.hold("global", "dispatch:1"):
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught
    assert gate.held("global") == 0
    assert held_rows(store) == []


async def test_on_demand_gate_vanishes_when_idle() -> None:
    store = InMemoryStore()
    gate = make_gate(store)
    assert gate.try_acquire_place("task:build:core")
    assert gate.is_full("task:build:core")
    assert "task:build:core" in gate.full_gates()
    slot = await gate.bind("task:build:core", "dispatch:1")
    await gate.release(slot)
    assert "task:build:core" not in {state.name for state in gate.snapshot()}


async def test_reconfigure_raises_capacity_and_wakes_waiters() -> None:
    store = InMemoryStore()
    gate = make_gate(store, global_=1)
    first = await gate.acquire("global", "a")
    waiter = asyncio.create_task(gate.acquire("global", "b"))
    await asyncio.sleep(0)
    assert not waiter.done()
    gate.reconfigure({"global": 2})
    second = await asyncio.wait_for(waiter, 1)
    assert gate.held("global") == 2
    await gate.release(first)
    await gate.release(second)


async def test_self_check_releases_rows_no_slot_owns() -> None:
    store = InMemoryStore()
    gate = make_gate(store)
    kept = await gate.acquire("global", "dispatch:1")
    orphan_id = await store.open_slot("global", "dispatch:99", "inst", FakeClock().now())
    foreign_id = await store.open_slot("global", "dispatch:98", "other", FakeClock().now())
    assert await gate.self_check() == 1
    assert store.slots[orphan_id].released_at is not None
    assert store.slots[foreign_id].released_at is None
    assert held_rows(store) == ["dispatch:1", "dispatch:98"]
    await gate.release(kept)


# -- names and capacities -------------------------------------------------------------------

NAMED = Settings.model_validate(
    {
        "gate": {"global": 3},
        "runners": {"shell": {"type": "exec", "concurrency": 2}, "free": {"type": "noop"}},
        "tasks": {
            "build": {
                "concurrency": 1,
                "concurrency_key": "{repo}",
                "steps": [{"name": "a", "runner": "shell", "args": ["{repo}"]}],
            },
            "open": {"steps": [{"name": "a", "runner": "free"}]},
        },
    }
)


def test_gate_names_are_made_and_read_in_one_place() -> None:
    assert runner_gate("shell") == "runner:shell"
    assert task_gate("build") == "task:build"
    assert task_gate("build", "core:x") == "task:build:core:x"
    assert GateName.parse(GLOBAL) == GateName(GateKind.GLOBAL)
    assert GateName.parse("runner:shell") == GateName(GateKind.RUNNER, "shell")
    assert GateName.parse("task:build:core:x") == GateName(GateKind.TASK, "build")
    assert GateName.parse("dispatch:1") is None
    task = NAMED.tasks["build"]
    assert task_gate_key("build", task, {"repo": "core"}) == "task:build:core"
    assert task_gate_key("open", NAMED.tasks["open"], {}) is None


def test_capacities_come_from_the_config_or_on_demand_from_the_task() -> None:
    assert gate_capacities(NAMED) == {"global": 3, "runner:shell": 2}
    assert [gate_capacity(NAMED, name) for name in ("global", "runner:shell")] == [3, 2]
    assert gate_capacity(NAMED, "task:build:core") == 1
    assert gate_capacity(NAMED, "task:gone") is None
    assert gate_capacity(NAMED, "runner:free") is None  # no concurrency: no gate


def test_a_step_holder_is_told_apart_from_a_step_with_a_longer_name() -> None:
    holder = step_holder(7, "lint", 2)
    assert holder == "dispatch:7/lint#2"
    assert held_by_step(holder, 7, "lint")
    assert not held_by_step(step_holder(7, "lint2", 1), 7, "lint")
    assert not held_by_step(dispatch_holder(7), 7, "lint")
