"""The APScheduler jobs on the running loop: configuration, the run after start, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from dispatcher.config import Settings
from dispatcher.errors import StoreBusy
from dispatcher.maintenance import MISFIRE_GRACE, PURGE_GATES, RETENTION, Maintenance, cron
from dispatcher.testing import FakeClock, InMemoryStore

DAY = 86400


def settings(**purge: Any) -> Settings:
    return Settings.model_validate({"purge": purge})


async def wait_for(predicate: Any) -> None:
    """Poll `predicate` (the jobs run on the scheduler's real-time timer)."""
    with anyio.fail_after(10):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


class BlockingStore(InMemoryStore):
    """`purge_released` waits until released (to catch a job mid-run)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def purge_released(self, before: datetime, batch_size: int) -> int:
        self.entered.set()
        await self.release.wait()
        return 0


class BusyStore(InMemoryStore):
    async def purge_released(self, before: datetime, batch_size: int) -> int:
        raise StoreBusy("database x is busy: database is locked; try again")


async def test_both_jobs_run_on_the_cron_and_soon_after_start() -> None:
    config = settings(schedule="17 3 * * *", startup_delay="10m")
    started = datetime.now(UTC)
    async with Maintenance(lambda: config, InMemoryStore(), FakeClock()) as maintenance:
        for job_id in (PURGE_GATES, RETENTION):
            job = maintenance.scheduler.get_job(job_id)
            assert job is not None
            assert (job.coalesce, job.max_instances) == (True, 1)
            assert job.misfire_grace_time == MISFIRE_GRACE
            assert str(job.trigger.timezone) == "UTC"
            fields = {f.name: str(f) for f in job.trigger.fields}
            assert (fields["minute"], fields["hour"]) == ("17", "3")
            assert job.next_run_time >= started + timedelta(minutes=10)
            assert job.next_run_time <= datetime.now(UTC) + timedelta(minutes=10)
    with pytest.raises(RuntimeError, match="not started"):
        maintenance.scheduler  # noqa: B018 - stopped: no scheduler left


async def test_the_run_after_start_purges_and_logs_one_event() -> None:
    store, clock = InMemoryStore(), FakeClock()
    old = clock.now() - timedelta(days=8)
    slot = await store.open_slot("global", "dispatch:1", "i", old)
    await store.close_slot(slot, old)
    held = await store.open_slot("global", "dispatch:2", "i", old)

    with capture_logs() as logs:
        async with Maintenance(lambda: settings(startup_delay="0"), store, clock):
            await wait_for(lambda: events(logs, "gates_purged"))
            await wait_for(lambda: events(logs, "dispatches_expired"))

    [purged] = events(logs, "gates_purged")
    assert (purged["deleted"], purged["batches"]) == (1, 1)
    assert purged["duration_ms"] >= 0
    assert list(store.slots) == [held]


async def test_stop_interrupts_a_running_job_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    store = BlockingStore()
    with capture_logs() as logs:
        async with Maintenance(lambda: settings(startup_delay="0"), store, FakeClock()):
            await asyncio.wait_for(store.entered.wait(), 10)
    assert events(logs, "maintenance_job_interrupted") == [
        {"event": "maintenance_job_interrupted", "job": PURGE_GATES, "log_level": "info"}
    ]
    assert events(logs, "gates_purged") == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_busy_database_is_logged_and_the_job_stays_scheduled() -> None:
    with capture_logs() as logs:
        config = settings(startup_delay="0")
        async with Maintenance(lambda: config, BusyStore(), FakeClock()) as maintenance:
            await wait_for(lambda: events(logs, "maintenance_job_failed"))
            job = maintenance.scheduler.get_job(PURGE_GATES)
            assert job is not None and job.next_run_time > datetime.now(UTC)
    [failed] = events(logs, "maintenance_job_failed")
    assert failed["job"] == PURGE_GATES and "busy" in failed["error"]


async def test_reschedule_applies_a_new_cron() -> None:
    config = settings(startup_delay="1h")
    async with Maintenance(lambda: config, InMemoryStore(), FakeClock()) as maintenance:
        maintenance.reschedule(settings(schedule="5 1 * * 0"))
        job = maintenance.scheduler.get_job(RETENTION)
        fields = {f.name: str(f) for f in job.trigger.fields}
        # cron's Sunday (0), in APScheduler's own numbering (Monday = 0)
        assert (fields["minute"], fields["hour"], fields["day_of_week"]) == ("5", "1", "6")


class LockedElsewhereStore(InMemoryStore):
    """Another daemon on the same (shared) database holds the maintenance locks."""

    @contextlib.asynccontextmanager
    async def maintenance_lock(self, name: str) -> AsyncIterator[bool]:
        yield False


async def test_a_job_another_instance_holds_is_skipped_and_deletes_nothing() -> None:
    store, clock = LockedElsewhereStore(), FakeClock()
    old = clock.now() - timedelta(days=8)
    slot = await store.open_slot("global", "dispatch:1", "i", old)
    await store.close_slot(slot, old)

    with capture_logs() as logs:
        async with Maintenance(lambda: settings(startup_delay="0"), store, clock):
            await wait_for(lambda: len(events(logs, "maintenance_job_skipped")) == 2)

    assert {e["job"] for e in events(logs, "maintenance_job_skipped")} == {PURGE_GATES, RETENTION}
    assert events(logs, "gates_purged") == []
    assert list(store.slots) == [slot]


def test_the_purge_schedule_numbers_the_days_of_the_week_as_cron_and_schedules_do() -> None:
    """0 is Sunday in a crontab (and in `[schedules.NAME] cron`); APScheduler 3's own
    numbering starts at Monday."""
    wednesday = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    for expression, weekday in (("0 3 * * 0", 6), ("0 3 * * 7", 6), ("0 3 * * 1-5", 3)):
        fire = cron(settings(schedule=expression)).get_next_fire_time(None, wednesday)
        assert fire is not None and fire.weekday() == weekday, expression
        assert fire.astimezone(UTC).hour == 3


def test_a_purge_schedule_naming_both_day_fields_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="not both"):
        settings(schedule="0 3 1 * 1")
