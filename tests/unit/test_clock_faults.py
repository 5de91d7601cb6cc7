"""The wall clock stepping backwards (NTP, a VM restored from a snapshot).

The daemon stamps records and `not_before` with the injected wall clock; step
timeouts, kill grace and backoff sleeps use anyio's monotonic clock. A step back
must not lose, repeat or wedge work: at worst a pending retry waits the step longer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from dispatcher.models import AttemptStatus, DispatchStatus
from dispatcher.runners.base import Outcome, RunRequest
from dispatcher.testing import FakeClock
from tests.helpers.pipeline import Harness

from .fakes import failed, ok

DAY = timedelta(days=1)


@dataclass
class TimeTravellingRunner:
    """Steps the clock back by a day while each step runs."""

    name: str
    clock: FakeClock
    script: list[Outcome]
    effects: bool = True

    async def run(self, request: RunRequest) -> Outcome:
        self.clock.set(self.clock.now() - DAY)
        return self.script.pop(0) if self.script else ok()


async def test_a_clock_stepping_back_mid_step_loses_and_repeats_nothing() -> None:
    h = Harness({})
    h.pipeline.runners = {"work": TimeTravellingRunner("work", h.clock, [])}
    started = h.clock.now()
    dispatch_id = await h.submit("three", x="1")

    assert await h.run_next() is DispatchStatus.SUCCEEDED

    assert h.attempts(dispatch_id) == [
        ("a", 1, AttemptStatus.SUCCEEDED),
        ("b", 1, AttemptStatus.SUCCEEDED),
        ("c", 1, AttemptStatus.SUCCEEDED),
    ]
    final = await h.store.get_dispatch(dispatch_id)
    assert final is not None and final.finished_at == started - 3 * DAY
    assert all(row.released_at is not None for row in h.store.slots.values())
    assert await h.store.claim_next("inst", h.clock.now(), set()) is None  # nothing left


async def test_a_retry_scheduled_before_a_step_back_waits_longer_but_runs() -> None:
    h = Harness({})
    runner = TimeTravellingRunner("work", h.clock, [ok(), failed(3)])
    h.pipeline.runners = {"work": runner}
    dispatch_id = await h.submit("three", x="1")

    assert await h.run_next() is DispatchStatus.QUEUED  # b failed, retry after backoff
    queued = await h.store.get_dispatch(dispatch_id)
    assert queued is not None and queued.not_before is not None
    # The clock went back a day during b: the retry is now a day (plus backoff) away.
    assert await h.store.claim_next("inst", h.clock.now(), set()) is None
    h.clock.set(queued.not_before)

    assert await h.run_next() is DispatchStatus.SUCCEEDED
    assert [n for step, n, _ in h.attempts(dispatch_id) if step == "b"] == [1, 2]
    assert [step for step, _, status in h.attempts(dispatch_id) if status == "succeeded"] == [
        "a",
        "b",
        "c",
    ]
