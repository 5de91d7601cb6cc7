"""Growth simulation: days of traffic through the real daemon, purged as scheduled.

Used by `tests/integration/test_growth.py` (scaled down) and `scripts/bench growth`
(full scale: 90 days at 10,000 dispatches a day). Each simulated day runs `per_day`
noop dispatches through an in-process `Daemon` (real gate, pipeline and SQLite store;
a fake clock stamps the rows), spread over the day; at midnight the daemon's own
`purge_gates` and `retention` jobs run, as the cron `0 0 * * *` would fire them.
The runner counts its executions, so `attempts` can be checked against what really ran.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio

from dispatcher.config import Settings
from dispatcher.daemon import Daemon
from dispatcher.models import NewDispatch
from dispatcher.runners.base import Outcome, RunRequest
from dispatcher.runners.noop import NoopRunner
from dispatcher.store.sqlite import SQLiteStore
from dispatcher.testing import FakeClock

DAY = 86400
START = datetime(2026, 1, 1, tzinfo=UTC)
CHUNK = 500


class CountingRunner(NoopRunner):
    """The noop runner, counting its executions per dispatch."""

    def __init__(self, name: str = "noop") -> None:
        super().__init__(name)
        self.runs: Counter[int] = Counter()

    async def run(self, request: RunRequest) -> Outcome:
        self.runs[request.dispatch_id] += 1
        return await super().run(request)


@dataclass(frozen=True)
class GrowthResult:
    days: int
    per_day: int
    dispatches_submitted: int
    gate_rows: int
    dispatch_rows: int
    attempt_rows: int
    runner_executions_retained: int
    """Executions the runner saw for the dispatches still in the database."""


def settings_for(db_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "database": {"path": str(db_path)},
            "daemon": {"poll_interval": "10ms"},
            "gate": {"global": 8},
            "runners": {"noop": {"type": "noop"}},
            "tasks": {"tick": {"steps": [{"name": "a", "runner": "noop"}]}},
            "purge": {"startup_delay": "3650d", "batch_size": 5000},
        }
    )


async def simulate(db_path: Path, days: int, per_day: int) -> GrowthResult:
    """Run `days` days of `per_day` dispatches; answer what the database holds after."""
    settings = settings_for(db_path)
    store = await SQLiteStore.open(db_path)
    clock = FakeClock(START)
    daemon = Daemon(settings, store, clock=clock)
    runner = CountingRunner()
    daemon.pipeline.runners = {"noop": runner}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            for day in range(days):
                await _one_day(daemon, store, clock, runner, day, per_day)
            daemon.stop()
    finally:
        await store.close()
    return _measure(db_path, days, per_day, runner)


async def _one_day(
    daemon: Daemon,
    store: SQLiteStore,
    clock: FakeClock,
    runner: CountingRunner,
    day: int,
    per_day: int,
) -> None:
    midnight = START + timedelta(days=day)
    chunks = max(1, -(-per_day // CHUNK))
    for index in range(chunks):
        clock.set(midnight + timedelta(seconds=DAY * index / chunks))
        size = min(CHUNK, per_day - index * CHUNK)
        news = [NewDispatch(task="tick", params={}) for _ in range(size)]
        await store.reserve_many(news, clock.now())
        daemon.wake()
        target = day * per_day + index * CHUNK + size
        while True:  # until this chunk has run
            if sum(runner.runs.values()) >= target and not daemon.state.inflight:
                break
            await asyncio.sleep(0.002)
    clock.set(midnight + timedelta(days=1))
    await daemon.maintenance.purge_gates()
    await daemon.maintenance.retention()


def _measure(db_path: Path, days: int, per_day: int, runner: CountingRunner) -> GrowthResult:
    with closing(sqlite3.connect(db_path)) as db:
        count = {
            table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("gates", "dispatches", "attempts")
        }
        retained = {row[0] for row in db.execute("SELECT id FROM dispatches")}
    return GrowthResult(
        days=days,
        per_day=per_day,
        dispatches_submitted=days * per_day,
        gate_rows=count["gates"],
        dispatch_rows=count["dispatches"],
        attempt_rows=count["attempts"],
        runner_executions_retained=sum(n for i, n in runner.runs.items() if i in retained),
    )
