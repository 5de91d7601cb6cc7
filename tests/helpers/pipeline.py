"""`Harness`: one daemon's pipeline on the in-memory store with a fake clock, for the
unit tests of Plan -> Execute (its runners are the test's own)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from dispatcher.config import Settings
from dispatcher.gate import ConcurrencyGate, gate_capacities, task_gate_capacity
from dispatcher.models import Attempt, AttemptStatus, Dispatch, DispatchStatus, NewDispatch
from dispatcher.pipeline import InFlight, Pipeline
from dispatcher.runners.base import Runner
from dispatcher.testing import FakeClock, InMemoryStore

INSTANCE = "inst"

CONFIG: dict[str, Any] = {
    "runners": {
        "work": {"type": "exec", "concurrency": 1},
        "crash": {"type": "exec"},
        "py": {"type": "python"},
    },
    "tasks": {
        "three": {
            "steps": [
                {"name": "a", "runner": "work", "args": ["{x}"]},
                {"name": "b", "runner": "work", "retries": 2, "backoff": "10s"},
                {"name": "c", "runner": "work"},
            ]
        },
        "crashy": {"steps": [{"name": "a", "runner": "crash"}]},
        "planned": {"planner": "python", "call": "tests.unit.planners:good_plan"},
        "badplan": {"planner": "python", "call": "tests.unit.planners:bad_plan"},
    },
}
"""The default configuration: a task of three steps on a runner capped at 1, one that
crashes, and two python planners (one gives a bad plan)."""


class Harness:
    """A pipeline, its gate, store and clock, on `config` with `runners`."""

    def __init__(
        self,
        runners: Mapping[str, Runner],
        store: InMemoryStore | None = None,
        config: Mapping[str, Any] = CONFIG,
    ) -> None:
        self.settings = Settings.model_validate(config)
        self.store = store or InMemoryStore()
        self.clock = FakeClock()
        self.gate = ConcurrencyGate(
            self.store,
            self.clock,
            INSTANCE,
            gate_capacities(self.settings),
            on_demand=lambda name: task_gate_capacity(self.settings, name),
        )
        self.pipeline = Pipeline(
            settings=self.settings,
            store=self.store,
            gate=self.gate,
            clock=self.clock,
            runners=runners,
            instance_id=INSTANCE,
            rand=random.Random(1),
        )

    async def submit(self, task: str, key: str | None = None, **params: Any) -> int:
        new = NewDispatch(task=task, params=params, key=key)
        return (await self.store.check_and_reserve(new, self.clock.now())).id

    async def claim(self) -> Dispatch:
        dispatch = await self.store.claim_next(INSTANCE, self.clock.now(), set())
        assert dispatch is not None
        return dispatch

    async def run_next(self, flight: InFlight | None = None) -> DispatchStatus:
        """Claim the next dispatch and run it to the status it is left in."""
        dispatch = await self.claim()
        return await self.pipeline.run(dispatch, flight or InFlight(dispatch.id))

    async def dispatch(self, dispatch_id: int) -> Dispatch:
        found = await self.store.get_dispatch(dispatch_id)
        assert found is not None
        return found

    def attempt_rows(self, dispatch_id: int) -> list[Attempt]:
        """The dispatch's attempts, oldest first."""
        rows = sorted(self.store.attempts.values(), key=lambda a: a.id)
        return [a for a in rows if a.dispatch_id == dispatch_id]

    def attempts(self, dispatch_id: int) -> list[tuple[str, int, AttemptStatus]]:
        """(step, attempt number, status) of each attempt, oldest first."""
        return [(a.step, a.attempt, a.status) for a in self.attempt_rows(dispatch_id)]
