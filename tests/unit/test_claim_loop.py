"""The dispatch loop: on a shared store, wake-ups while a claim is in flight, and which
wake-ups start a claim at all (NOTIFY without a storm); on any store, how many places
one claim takes."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from dispatcher.claims import _DispatchTasks
from dispatcher.config import load_settings
from dispatcher.daemon import Daemon
from dispatcher.errors import LeaseLost
from dispatcher.gate import GLOBAL
from dispatcher.models import DispatchStatus, NewDispatch
from dispatcher.store.base import GrantedClaim, Store
from dispatcher.store.writes import Fold, Params, WriteBatch
from dispatcher.testing import FakeClock, InMemoryStore

CONFIG = """
[database]
path = "d.db"
[daemon]
poll_interval = "60s"
[gate]
global = 2
[runners.noop]
type = "noop"
[tasks.n]
steps = [{ name = "a", runner = "noop" }]
"""


class HeldClaimStore(InMemoryStore):
    """The in-memory store posing as a shared one, whose claims wait until a test lets
    them through, counting how many run and how many at once."""

    shared = True

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0
        self.at_once = 0
        self.most_at_once = 0
        self.in_claim = asyncio.Event()
        self.let_through = asyncio.Event()

    async def _claim_with_slots(
        self, params: Mapping[str, Any], slot_ids: Sequence[int]
    ) -> GrantedClaim:
        self.claims += 1
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        self.in_claim.set()
        try:
            await self.let_through.wait()
            return await super()._claim_with_slots(params, slot_ids)
        finally:
            self.at_once -= 1


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


async def test_wake_ups_during_a_claim_start_no_claim_beside_it_and_one_after(
    tmp_path: Path,
) -> None:
    (tmp_path / "dispatcher.toml").write_text(CONFIG)
    store, clock = HeldClaimStore(), FakeClock()
    daemon = Daemon(load_settings(tmp_path / "dispatcher.toml", {}), store, clock=clock)
    loop = asyncio.create_task(daemon.claims.run())
    try:
        await asyncio.wait_for(store.in_claim.wait(), 5)
        for _ in range(5):  # submissions, releases, cancels: NOTIFYs from other daemons
            daemon._database_changed()
            daemon._slots_released()
            daemon.wake()
        await settle()
        assert (store.claims, store.most_at_once) == (1, 1)  # nothing beside it

        store.let_through.set()
        await settle()
        # One claim after it, for what may have come after its snapshot; not five.
        assert (store.claims, store.most_at_once) == (2, 1)

        for _ in range(5):  # releases while the queue is empty: no claim
            daemon._slots_released()
            daemon._cancel_requested()
        await settle()
        assert store.claims == 2

        new = NewDispatch(task="n", params={})
        dispatch_id = (await store.check_and_reserve(new, clock.now())).id
        daemon._database_changed()  # its NOTIFY
        await settle()
        assert store.claims >= 3  # claimed (then once more, as its end freed a place)
        assert store.dispatches[dispatch_id].status is DispatchStatus.SUCCEEDED
        held = [slot for slot in store.slots.values() if slot.released_at is None]
        assert held == []  # its `global` row, granted with the claim, was released
    finally:
        daemon.stop()
        await asyncio.wait_for(loop, 5)


async def test_a_release_elsewhere_wakes_a_loop_the_shared_cap_stopped(tmp_path: Path) -> None:
    (tmp_path / "dispatcher.toml").write_text(CONFIG)
    store, clock = HeldClaimStore(), FakeClock()
    store.let_through.set()
    daemon = Daemon(load_settings(tmp_path / "dispatcher.toml", {}), store, clock=clock)
    others = [await store.try_take_slot("global", f"x{n}", "other", 2, clock.now()) for n in (1, 2)]
    new = NewDispatch(task="n", params={})
    dispatch_id = (await store.check_and_reserve(new, clock.now())).id
    loop = asyncio.create_task(daemon.claims.run())
    try:
        await settle()
        assert store.claims == 1  # the other daemon holds both places: nothing claimed
        assert store.dispatches[dispatch_id].status is DispatchStatus.QUEUED

        assert others[0] is not None
        await store.close_slot(others[0], clock.now())
        daemon._slots_released()  # its NOTIFY
        await settle()
        assert store.claims >= 2
        assert store.dispatches[dispatch_id].status is DispatchStatus.SUCCEEDED
    finally:
        daemon.stop()
        await asyncio.wait_for(loop, 5)


class SlowClaimStore(InMemoryStore):
    """The in-memory store whose claims wait, before they go out, until a test lets them
    through (as a claim waits behind a batch of writes on SQLite's one connection),
    recording how many dispatches each asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []
        self.hold = True
        self.in_claim = asyncio.Event()
        self.let_through = asyncio.Event()

    async def _execute(self, name: str, params: Mapping[str, Any], *, first: bool) -> list[Any]:
        if name == "claim_many":
            if self.hold:
                self.in_claim.set()
                await self.let_through.wait()
                self.in_claim.clear()
                self.let_through.clear()
            limit = params["limit"]
            self.asked.append(limit() if callable(limit) else limit)
            return await super()._execute(name, {**params, "limit": self.asked[-1]}, first=first)
        return await super()._execute(name, params, first=first)


async def test_places_given_back_while_a_claim_waits_to_go_out_join_that_claim(
    tmp_path: Path,
) -> None:
    (tmp_path / "dispatcher.toml").write_text(CONFIG.replace("global = 2", "global = 4"))
    store, clock = SlowClaimStore(), FakeClock()
    daemon = Daemon(load_settings(tmp_path / "dispatcher.toml", {}), store, clock=clock)
    for n in range(8):
        await store.check_and_reserve(NewDispatch(task="n", params={"n": n}), clock.now())
    elsewhere = [daemon.gate.try_acquire_place(GLOBAL) for _ in range(3)]  # 3 of 4 held
    assert all(elsewhere)
    loop = asyncio.create_task(daemon.claims.run())
    try:
        await asyncio.wait_for(store.in_claim.wait(), 5)  # it woke with one place free
        for _ in elsewhere:  # the other three come back while the claim waits
            daemon.gate.give_back(GLOBAL)
        store.let_through.set()
        await asyncio.wait_for(store.in_claim.wait(), 5)  # the next claim
        assert store.asked == [4]  # one claim for all four places, not 1 then 3

        store.hold = False
        store.let_through.set()
        await settle()
        statuses = [d.status for d in store.dispatches.values()]
        assert statuses == [DispatchStatus.SUCCEEDED] * 8
        held = {state.name: state.held for state in daemon.gate.snapshot()}
        assert held[GLOBAL] == 0  # every place given back
    finally:
        daemon.stop()
        store.let_through.set()
        await asyncio.wait_for(loop, 5)


class SlowWritesStore(InMemoryStore):
    """The in-memory store whose writes are queued, as a real store's are (the fake
    applies them at once), and land a moment after they are sent: a claim runs ahead
    of them."""

    def _queue(self, name: str, key: Any, params: Params, fold: Fold = "replace") -> None:
        Store._queue(self, name, key, params, fold)

    async def _write_batch(self, writes: WriteBatch, fence: str | None) -> None:
        await asyncio.sleep(0.02)
        await super()._write_batch(writes, fence)


async def test_a_dispatch_that_follows_another_starts_once_that_one_ends_not_a_poll_later(
    tmp_path: Path,
) -> None:
    """The claim that an ending dispatch wakes runs ahead of its final write, so it sees
    the dispatch still running and passes over the one that follows it; once that
    write has landed the loop must claim again, not sleep out `poll_interval` (60 s)."""
    (tmp_path / "dispatcher.toml").write_text(CONFIG)
    store, clock = SlowWritesStore(), FakeClock()
    daemon = Daemon(load_settings(tmp_path / "dispatcher.toml", {}), store, clock=clock)
    first = (await store.check_and_reserve(NewDispatch(task="n", params={}), clock.now())).id
    then = NewDispatch(task="n", params={"n": 2}, follows=first)
    second = (await store.check_and_reserve(then, clock.now())).id
    loop = asyncio.create_task(daemon.claims.run())
    try:
        for _ in range(300):  # 3 s of real time, far below the 60 s poll
            if store.dispatches[second].status is DispatchStatus.SUCCEEDED:
                break
            await asyncio.sleep(0.01)
        assert store.dispatches[first].status is DispatchStatus.SUCCEEDED
        assert store.dispatches[second].status is DispatchStatus.SUCCEEDED
    finally:
        daemon.stop()
        await asyncio.wait_for(loop, 5)


class FencedFlushStore(InMemoryStore):
    """A shared store whose queued writes were refused by the lease fence: `flush`
    raises what refused them, as the write buffer does."""

    shared = True

    @property
    def writes_queued(self) -> bool:
        return True

    async def flush(self) -> None:
        raise LeaseLost("instance x was reaped: its writes are refused")


async def test_waiting_for_ended_dispatches_writes_survives_a_refused_flush(
    tmp_path: Path,
) -> None:
    """The write path reports a fenced or failed batch through its own hooks (the lease
    is lost, the daemon rejoins); the claim loop, waiting for those writes only to
    claim again, must not die of it."""
    (tmp_path / "dispatcher.toml").write_text(CONFIG)
    daemon = Daemon(load_settings(tmp_path / "dispatcher.toml", {}), FencedFlushStore())
    daemon.claims._ended = 1  # a dispatch ended since the last wait

    assert daemon.claims._ended_unwritten()
    await daemon.claims._let_ends_land()  # no LeaseLost out of it

    assert not daemon.claims._ended_unwritten()  # and it does not wait again for them


# -- the dispatches' tasks --------------------------------------------------------------


async def test_leaving_the_dispatch_tasks_waits_for_every_one_of_them() -> None:
    ended: list[int] = []

    async def dispatch(n: int) -> None:
        await asyncio.sleep(0.01 * n)
        ended.append(n)

    async with _DispatchTasks() as work:
        for n in (3, 1, 2):
            work.start_soon(dispatch, n)

    assert sorted(ended) == [1, 2, 3]


async def test_an_error_escaping_a_dispatch_task_stops_the_loop_and_is_raised() -> None:
    """As a task group would: a defect is not lost in a task nobody awaits."""
    loop_cancelled = asyncio.Event()

    async def broken() -> None:
        raise RuntimeError("a defect")

    with pytest.raises(RuntimeError, match="a defect"):
        async with _DispatchTasks() as work:
            work.start_soon(broken)
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                loop_cancelled.set()
                raise

    assert loop_cancelled.is_set()


async def test_a_loop_cancelled_from_outside_cancels_its_tasks_but_not_their_shielded_writes() -> (
    None
):
    """The tasks are cancelled through their cancel scopes (anyio's), so a write a step
    shields (its attempt's end) still lands."""
    started = asyncio.Event()
    landed: list[str] = []

    async def dispatch() -> None:
        try:
            started.set()
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            landed.append("cancelled")
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await asyncio.sleep(0.01)
                landed.append("attempt end")

    async def loop() -> None:
        async with _DispatchTasks() as work:
            work.start_soon(dispatch)
            await asyncio.sleep(10)

    async with anyio.create_task_group() as tg:
        tg.start_soon(loop)
        await started.wait()
        tg.cancel_scope.cancel()

    assert landed == ["cancelled", "attempt end"]
