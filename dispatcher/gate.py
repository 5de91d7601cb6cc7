"""The concurrency gate: named FIFO semaphores in memory, mirrored to `gates` rows.

The in-memory semaphore decides; the row is for visibility and recovery. A slot is
released exactly once, always (shielded from cancellation), and the freed place goes
to the longest waiter at once.

Gate names: `global` (dispatches in flight), `runner:NAME` (steps of one runner) and
`task:NAME` / `task:NAME:VALUE` (per-task caps, made on demand, dropped when idle).
They are made and read only by the functions of "Names and capacities" below, and so
are the holders' names (`dispatch:ID`, `dispatch:ID/STEP#ATTEMPT`).

On a shared store (PostgreSQL, several daemons) the semaphore is only the local fast
path: a place of any gate (`global`, `runner:*`, `task:*`) is granted when the database
agrees too (`Store.try_take_slot` counts the held rows of every daemon under a lock, in
one statement; the daemon's claim takes its `global` places the same way, with the
dispatches: `Store.claim_with_slots`, then `adopt`), and a waiter retries when woken
(`db_changed`: NOTIFY of a released row) or every `poll_interval`. So every cap holds
across all the daemons together.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dispatcher import logs
from dispatcher.clock import Clock
from dispatcher.config import Settings, TaskSettings
from dispatcher.store.base import Store
from dispatcher.templating import fill

log = logs.get_logger("dispatcher.gate")

# -- names and capacities ----------------------------------------------------------------

GLOBAL = "global"
"""The gate of dispatches in flight (planning or running)."""

_RUNNER = "runner:"
_TASK = "task:"


class GateKind(Enum):
    GLOBAL = "global"
    RUNNER = "runner"
    """`runner:NAME`: steps of one runner at once."""
    TASK = "task"
    """`task:NAME` or `task:NAME:VALUE`: dispatches of one task (per value of its
    `concurrency_key`) at once."""


@dataclass(frozen=True, slots=True)
class GateName:
    """A gate's name, read: its kind, and the runner or task it caps."""

    kind: GateKind
    owner: str | None = None
    """The runner's or the task's name (None for `global`)."""

    @classmethod
    def parse(cls, name: str) -> GateName | None:
        """What `name` names; None for a name no gate of this version has."""
        if name == GLOBAL:
            return cls(GateKind.GLOBAL)
        if name.startswith(_RUNNER):
            return cls(GateKind.RUNNER, name.removeprefix(_RUNNER))
        if name.startswith(_TASK):
            return cls(GateKind.TASK, name.removeprefix(_TASK).split(":", 1)[0])
        return None


def runner_gate(runner: str) -> str:
    """The gate of the runner named `runner`: `runner:NAME`."""
    return f"{_RUNNER}{runner}"


def task_gate(task: str, value: str | None = None) -> str:
    """The gate of a task, `task:NAME`, or of one value of its key: `task:NAME:VALUE`."""
    return f"{_TASK}{task}" if value is None else f"{_TASK}{task}:{value}"


def kind_of(name: str) -> GateKind | None:
    parsed = GateName.parse(name)
    return None if parsed is None else parsed.kind


def task_gate_key(task_name: str, task: TaskSettings, params: Mapping[str, Any]) -> str | None:
    """The per-task gate a dispatch of `task` with `params` needs, if any."""
    if task.concurrency is None:
        return None
    if task.concurrency_key is None:
        return task_gate(task_name)
    return task_gate(task_name, fill(task.concurrency_key, params))


def gate_capacities(settings: Settings) -> dict[str, int]:
    """Configured gates: `global` and one per runner with a `concurrency`."""
    capacities = {GLOBAL: settings.gate.global_}
    for name, runner in settings.runners.items():
        if runner.concurrency is not None:
            capacities[runner_gate(name)] = runner.concurrency
    return capacities


def task_gate_capacity(settings: Settings, gate: str) -> int | None:
    """Capacity of a per-task gate by its name (gates made on demand), else None."""
    if not gate.startswith(_TASK):  # asked for every step's runner gate: answer cheaply
        return None
    parsed = GateName.parse(gate)
    if parsed is None or parsed.kind is not GateKind.TASK or parsed.owner is None:
        return None
    task = settings.tasks.get(parsed.owner)
    return task.concurrency if task else None


def gate_capacity(settings: Settings, gate: str) -> int | None:
    """Capacity of any gate by its name: configured, or made on demand."""
    configured = gate_capacities(settings)
    return configured[gate] if gate in configured else task_gate_capacity(settings, gate)


def dispatch_holder(dispatch_id: int) -> str:
    """Who holds a dispatch's `global` and per-task places."""
    return f"dispatch:{dispatch_id}"


def step_holder(dispatch_id: int, step: str, attempt: int) -> str:
    """Who holds a runner place: one attempt of one step."""
    return f"dispatch:{dispatch_id}/{step}#{attempt}"


def held_by_step(holder: str, dispatch_id: int, step: str) -> bool:
    """Whether `holder` is an attempt of `step` of that dispatch (see `step_holder`)."""
    return holder.startswith(f"dispatch:{dispatch_id}/{step}#")


class FifoSemaphore:
    """A counting semaphore that serves waiters strictly in arrival order.

    Its capacity can change at run time; lowering it never takes a held place away,
    it only stops new grants until enough are released.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def full(self) -> bool:
        return self.held >= self.capacity

    def try_acquire(self) -> bool:
        """Take a place if one is free and nobody waits ahead of us."""
        if self.held < self.capacity and not self.waiting:
            self.held += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Granted and cancelled in the same tick: pass the place on.
                self.release()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        if self.held <= 0:
            raise RuntimeError("semaphore released more often than acquired")
        self.held -= 1
        self._wake()

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.held += 1
                waiter.set_result(None)


@dataclass(eq=False)
class Slot:
    """One held place in one gate, and the id of its `gates` row (a `SlotRow` once read
    back from the database)."""

    gate: str
    holder: str
    row_id: int | None = None
    released: bool = field(default=False)


@dataclass(frozen=True, slots=True)
class GateState:
    name: str
    capacity: int
    held: int
    waiting: int
    holders: tuple[str, ...]


class ConcurrencyGate:
    """Named semaphores with their `gates` rows; see the module docstring."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        instance_id: str,
        capacities: Mapping[str, int],
        on_demand: Callable[[str], int | None] = lambda name: None,
        poll_interval: float = 1.0,
        task_gates: Callable[[], bool] = lambda: True,
    ) -> None:
        self._store = store
        self._shared = store.shared
        self._poll_interval = poll_interval
        self._db_changed = asyncio.Event()
        self._clock = clock
        self.instance_id = instance_id
        """This instance (it changes when a daemon rejoins after a lost lease)."""
        self._configured: dict[str, int] = dict(capacities)
        self._on_demand = on_demand
        self._task_gates = task_gates
        """Whether any per-task gate may exist (a task with a `concurrency`)."""
        self._sems: dict[str, FifoSemaphore] = {
            name: FifoSemaphore(cap) for name, cap in capacities.items()
        }
        self._holders: dict[str, set[Slot]] = {name: set() for name in capacities}

    # -- reading ------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self._sems or self._on_demand(name) is not None

    def is_full(self, name: str) -> bool:
        sem = self._sems.get(name)
        return sem is not None and (sem.full or sem.waiting > 0)

    def full_gates(self) -> set[str]:
        """Names of gates that cannot grant a place right now (as this daemon sees them)."""
        return {name for name in self._sems if self.is_full(name)}

    async def blocked_gates(self) -> set[str]:
        """`full_gates`, and on a shared store the per-task gates whose places other
        daemons hold (so the claim passes over their dispatches instead of taking and
        giving them back)."""
        blocked = self.full_gates()
        if not self._shared or not self._task_gates():
            return blocked
        held: dict[str, int] = {}
        for row in await self._store.held_slots():
            if kind_of(row.gate) is GateKind.TASK:
                held[row.gate] = held.get(row.gate, 0) + 1
        for name, count in held.items():
            capacity = self._configured.get(name) or self._on_demand(name)
            if capacity is not None and count >= capacity:
                blocked.add(name)
        return blocked

    def snapshot(self) -> list[GateState]:
        return [
            GateState(
                name=name,
                capacity=sem.capacity,
                held=sem.held,
                waiting=sem.waiting,
                holders=tuple(sorted(slot.holder for slot in self._holders[name])),
            )
            for name, sem in sorted(self._sems.items())
        ]

    def capacity(self, name: str) -> int:
        """The configured capacity of a gate (this daemon's value)."""
        return self._semaphore(name).capacity

    def held(self, name: str) -> int:
        sem = self._sems.get(name)
        return sem.held if sem else 0

    # -- configuration --------------------------------------------------------------------

    def reconfigure(self, capacities: Mapping[str, int]) -> None:
        """Apply new capacities; gates no longer configured go once they are idle."""
        for name, capacity in capacities.items():
            if name in self._sems:
                self._sems[name].set_capacity(capacity)
            else:
                self._sems[name] = FifoSemaphore(capacity)
                self._holders[name] = set()
        self._configured = dict(capacities)
        for name in list(self._sems):
            self._drop_if_idle(name)

    # -- acquiring --------------------------------------------------------------------------

    async def acquire(self, name: str, holder: str) -> Slot:
        """Wait for a place (in arrival order), then write its row."""
        sem = self._semaphore(name)
        await sem.acquire()
        if self._is_shared(name):
            try:
                return await self._take_shared(name, holder)
            except BaseException:
                self.give_back(name)
                raise
        return await self._mirror(name, holder)

    def db_changed(self) -> None:
        """Another daemon may have released a slot: shared waiters ask again at once."""
        self._db_changed.set()

    async def room(self, name: str) -> int:
        """Places the database would still grant for `name` (all daemons together); a
        large number where the gate is not shared."""
        if not self._is_shared(name):
            return 1 << 30
        held = sum(1 for row in await self._store.held_slots() if row.gate == name)
        return self._sems[name].capacity - held

    async def try_bind(self, name: str, holder: str) -> Slot | None:
        """`bind`, except that on a shared gate the database may refuse. When it refuses
        (None) or the write fails (an error), the place taken by `wait_free` (or
        `try_acquire_place`) has been given back."""
        if not self._is_shared(name):
            return await self._mirror(name, holder)  # gives the place back on error
        try:
            row_id = await self._store.try_take_slot(
                name, holder, self.instance_id, self._sems[name].capacity, self._clock.now()
            )
        except BaseException:
            self.give_back(name)
            raise
        if row_id is None:
            self.give_back(name)
            return None
        return self._own(name, holder, row_id)

    def adopt(self, name: str, holder: str, row_id: int) -> Slot:
        """Bind a place taken by `wait_free` (or `try_acquire_place`) to a held row the
        database already granted (`Store.claim_with_slots`)."""
        return self._own(name, holder, row_id)

    async def wait_free(self, name: str) -> None:
        """Take a place without a holder yet; follow with `bind` or `give_back`."""
        await self._semaphore(name).acquire()

    def give_back(self, name: str) -> None:
        """Return a place taken by `wait_free` that was never bound to a holder."""
        self._sems[name].release()
        self._drop_if_idle(name)

    async def bind(self, name: str, holder: str) -> Slot:
        """Name the holder of a place taken by `wait_free` and write its row."""
        return await self._mirror(name, holder)

    def try_acquire_place(self, name: str) -> bool:
        return self._semaphore(name).try_acquire()

    async def release(self, slot: Slot) -> None:
        """Give the place back and stamp the row, exactly once, even when cancelled."""
        if slot.released:
            return
        slot.released = True
        self._holders[slot.gate].discard(slot)
        self._sems[slot.gate].release()
        self._drop_if_idle(slot.gate)
        if slot.row_id is not None:
            # Queued, not awaited: nothing here can be cancelled half-way.
            self._store.mirror_close(slot.row_id, self._clock.now())

    @asynccontextmanager
    async def hold(self, name: str, holder: str) -> AsyncIterator[Slot]:
        slot = await self.acquire(name, holder)
        try:
            yield slot
        finally:
            await self.release(slot)

    # -- self-check ---------------------------------------------------------------------------

    async def self_check(self) -> int:
        """Compare held rows of this instance with the semaphores; repair and log drift.

        A row held in the database by this instance that no in-memory slot owns is
        released; answers how many rows were repaired.
        """
        rows = await self._store.held_slots()
        # Matched by (gate, holder), not row id: a slot being mirrored right now has
        # its row committed before its row id is known here.
        owned = {(slot.gate, slot.holder) for slots in self._holders.values() for slot in slots}
        repaired = 0
        for row in rows:
            if row.instance_id != self.instance_id or (row.gate, row.holder) in owned:
                continue
            if await self._store.close_slot(row.id, self._clock.now()):
                repaired += 1
                log.warning("gate_drift_repaired", gate=row.gate, holder=row.holder)
        return repaired

    # -- internals -----------------------------------------------------------------------

    def _semaphore(self, name: str) -> FifoSemaphore:
        sem = self._sems.get(name)
        if sem is None:
            capacity = self._on_demand(name)
            if capacity is None:
                raise KeyError(f"unknown gate {name!r}")
            sem = self._sems[name] = FifoSemaphore(capacity)
            self._holders[name] = set()
        return sem

    async def _mirror(self, name: str, holder: str) -> Slot:
        slot = Slot(gate=name, holder=holder)
        self._holders[name].add(slot)
        try:
            slot.row_id = await self._store.mirror_open(
                name, holder, self.instance_id, self._clock.now()
            )
        except BaseException:
            await self.release(slot)
            raise
        return slot

    def _is_shared(self, name: str) -> bool:
        """Whether the database decides this gate's places (every gate on a shared
        store: `global`, `runner:*` and the per-task `task:*`)."""
        return self._shared

    async def _take_shared(self, name: str, holder: str) -> Slot:
        """Ask the database until it grants a place, waking on `db_changed` or a poll."""
        while True:
            self._db_changed.clear()
            row_id = await self._store.try_take_slot(
                name, holder, self.instance_id, self._sems[name].capacity, self._clock.now()
            )
            if row_id is not None:
                return self._own(name, holder, row_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._db_changed.wait(), self._poll_interval)

    def _own(self, name: str, holder: str, row_id: int) -> Slot:
        slot = Slot(gate=name, holder=holder, row_id=row_id)
        self._holders[name].add(slot)
        return slot

    def _drop_if_idle(self, name: str) -> None:
        sem = self._sems[name]
        if name not in self._configured and sem.held == 0 and not sem.waiting:
            del self._sems[name]
            del self._holders[name]
