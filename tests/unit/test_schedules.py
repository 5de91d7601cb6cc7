"""Schedules on a fake clock: fire times (cron, every, daylight saving), catch-up after a
downtime, overlap policies, exactly once per fire across restarts and daemons, reload."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from dispatcher.config import ScheduleSettings, Settings
from dispatcher.models import DispatchStatus
from dispatcher.schedules import FireTimes, Schedules, cron_trigger, due_fires, fire_key
from dispatcher.service import schedule_dispatch
from dispatcher.testing import FakeClock, InMemoryStore

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def spec(**fields: Any) -> ScheduleSettings:
    return ScheduleSettings.model_validate({"task": "t", **fields})


def settings(**schedules: dict[str, Any]) -> Settings:
    return Settings.model_validate(
        {
            "runners": {"n": {"type": "noop"}},
            "tasks": {"t": {"steps": [{"name": "s", "runner": "n", "args": ["{x}"]}]}},
            "schedules": {
                name: {"task": "t", "params": {"x": "1"}, **fields}
                for name, fields in schedules.items()
            },
        }
    )


def fires(times: FireTimes, start: datetime, count: int) -> list[datetime]:
    found, at = [], start
    for _ in range(count):
        nxt = times.next_after(at)
        assert nxt is not None
        found.append(nxt)
        at = nxt
    return found


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]  # year, month, day, ...


# -- fire times ----------------------------------------------------------------------------


def test_every_is_aligned_to_the_epoch_so_every_daemon_computes_the_same_times() -> None:
    times = FireTimes(spec(every="2s"))
    assert fires(times, T0 + timedelta(milliseconds=500), 3) == [
        T0 + timedelta(seconds=2),
        T0 + timedelta(seconds=4),
        T0 + timedelta(seconds=6),
    ]
    assert times.next_after(T0) == T0 + timedelta(seconds=2)  # strictly after


def test_cron_weekdays_are_standard_cron_ones_sunday_being_0_or_7() -> None:
    monday = FireTimes(spec(cron="0 9 * * 1")).next_after(utc(2026, 1, 1))
    assert monday is not None and monday.strftime("%A %H:%M") == "Monday 09:00"
    for sunday_expr in ("0 9 * * 0", "0 9 * * 7", "0 9 * * sun"):
        sunday = FireTimes(spec(cron=sunday_expr)).next_after(utc(2026, 1, 1))
        assert sunday is not None and sunday.strftime("%A") == "Sunday", sunday_expr
    workdays = fires(FireTimes(spec(cron="0 9 * * 1-5")), utc(2026, 1, 4), 6)  # a Sunday
    assert [d.strftime("%a") for d in workdays] == ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon"]
    every_other = fires(FireTimes(spec(cron="0 9 * * */2")), utc(2026, 1, 3, 12), 4)
    assert [d.strftime("%a") for d in every_other] == ["Sun", "Tue", "Thu", "Sat"]


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("0 9 * * 8", "invalid day of week"),
        ("0 9 1 * 1", "not both"),
        ("0 9 * *", "expected 5 fields"),
        ("61 * * * *", "61"),
    ],
)
def test_bad_cron_expressions_are_refused_with_the_reason(expression: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        cron_trigger(expression, "UTC")


def test_a_cron_that_never_matches_has_no_next_fire() -> None:
    assert FireTimes(spec(cron="0 0 30 2 *")).next_after(T0) is None


def test_daylight_saving_spring_a_skipped_wall_time_fires_once_an_hour_later() -> None:
    # Europe/Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist.
    times = FireTimes(spec(cron="30 2 * * *", timezone="Europe/Berlin"))
    got = fires(times, utc(2026, 3, 27, 12), 3)
    assert [d.astimezone(BERLIN).strftime("%d %H:%M %Z") for d in got] == [
        "28 02:30 CET",
        "29 03:30 CEST",
        "30 02:30 CEST",
    ]


def test_daylight_saving_autumn_a_repeated_wall_time_fires_once_at_its_first_occurrence() -> None:
    # Europe/Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    times = FireTimes(spec(cron="30 2 * * *", timezone="Europe/Berlin"))
    got = fires(times, utc(2026, 10, 23, 12), 3)
    assert got == [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    assert [d.astimezone(BERLIN).strftime("%d %H:%M %Z") for d in got] == [
        "24 02:30 CEST",
        "25 02:30 CEST",
        "26 02:30 CET",
    ]


def test_daylight_saving_autumn_an_hourly_schedule_follows_real_time() -> None:
    # New York, 2026-11-01: 02:00 EDT becomes 01:00 EST; the local day has 25 hours.
    times = FireTimes(spec(cron="0 * * * *", timezone="America/New_York"))
    start = datetime(2026, 11, 1, tzinfo=NEW_YORK).astimezone(UTC)
    day = times.between(start - timedelta(seconds=1), start + timedelta(hours=25, minutes=-1), 100)
    assert len(day) == 25
    assert all(b - a == timedelta(hours=1) for a, b in pairwise(day))


def test_daylight_saving_spring_an_hourly_schedule_has_23_fires_that_day() -> None:
    times = FireTimes(spec(cron="0 * * * *", timezone="America/New_York"))
    start = datetime(2026, 3, 8, tzinfo=NEW_YORK).astimezone(UTC)
    day = times.between(start - timedelta(seconds=1), start + timedelta(hours=23, minutes=-1), 100)
    assert len(day) == 23
    assert all(b - a == timedelta(hours=1) for a, b in pairwise(day))


def test_the_fire_key_names_the_schedule_and_the_fire_time_in_utc() -> None:
    at = datetime(2026, 3, 29, 3, 30, tzinfo=BERLIN)
    assert fire_key("nightly", at) == "schedule:nightly:2026-03-29T01:30:00Z"


# -- catch-up: pure ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [("none", []), ("last", [50]), ("all", [46, 47, 48, 49, 50])],
)
def test_missed_fires_follow_the_catch_up_policy(catch_up: str, expected: list[int]) -> None:
    times = FireTimes(spec(every="10s"))
    cursor = T0  # fired last at T0; down until T0 + 501.5 s
    due = due_fires(times, cursor, T0 + timedelta(seconds=501.5), catch_up, limit=5)
    assert due.fires == [T0 + timedelta(seconds=10 * n) for n in expected]
    assert due.missed == 6  # counted up to the limit, plus one: "more than 5"


def test_a_fire_late_by_less_than_the_grace_is_on_time_whatever_the_policy() -> None:
    times = FireTimes(spec(every="10s"))
    due = due_fires(times, T0, T0 + timedelta(seconds=10.4), "none", limit=5)
    assert due.fires == [T0 + timedelta(seconds=10)]
    assert due.missed == 0


def test_catching_up_after_years_down_looks_back_only_as_far_as_needed() -> None:
    times = FireTimes(spec(every="1s"))
    due = due_fires(times, T0 - timedelta(days=3 * 365), T0, "all", limit=100)
    assert len(due.fires) == 101  # the last 100 missed, and the one on time
    assert due.fires[-1] == T0


# -- firing: exactly once ----------------------------------------------------------------------


def make(store: InMemoryStore, clock: FakeClock, config: Settings, **kwargs: Any) -> Schedules:
    return Schedules(
        config,
        store,
        clock,
        lambda name, sched, at: schedule_dispatch(config, name, sched, at),
        **kwargs,
    )


def keys(store: InMemoryStore) -> list[str]:
    return sorted(d.key or "" for d in store.dispatches.values())


def finish_all(store: InMemoryStore) -> None:
    for row in store.tables["dispatches"].values():
        row["status"] = "succeeded"


class Counts:
    def __init__(self) -> None:
        self.fired: list[tuple[str, float]] = []
        self.skipped: list[str] = []

    def schedule_fired(self, schedule: str, lag_s: float) -> None:
        self.fired.append((schedule, lag_s))

    def schedule_skipped(self, schedule: str) -> None:
        self.skipped.append(schedule)

    def dispatch_started(self, task: str, waited_s: float) -> None: ...
    def dispatch_finished(self, task: str, status: str) -> None: ...
    def attempt_finished(self, runner: str, status: str, duration_s: float) -> None: ...
    def purge_finished(self, deleted: int, duration_s: float) -> None: ...


async def test_each_fire_makes_one_dispatch_keyed_by_its_time() -> None:
    store, clock = InMemoryStore(), FakeClock(T0)
    counts = Counts()
    schedules = make(
        store, clock, settings(tick={"every": "2s", "overlap": "allow"}), observer=counts
    )
    await schedules.load()
    clock.advance(2.25)
    assert await schedules.fire_due() == pytest.approx(1.75)
    clock.advance(1.75)
    await schedules.fire_due()
    await schedules.fire_due()  # nothing new is due: nothing more
    assert keys(store) == [
        "schedule:tick:2026-06-01T12:00:02Z",
        "schedule:tick:2026-06-01T12:00:04Z",
    ]
    assert counts.fired == [("tick", pytest.approx(0.25)), ("tick", 0.0)]
    dispatch = store.dispatches[1]
    assert (dispatch.task, dispatch.params, dispatch.status) == ("t", {"x": "1"}, "queued")


async def test_two_daemons_firing_one_schedule_make_one_dispatch_per_fire() -> None:
    store, clock = InMemoryStore(), FakeClock(T0)
    config = settings(tick={"every": "2s", "overlap": "allow"})
    first, second = make(store, clock, config), make(store, clock, config)
    await first.load()
    await second.load()
    for _ in range(5):
        clock.advance(2)
        await second.fire_due()
        await first.fire_due()
    assert len(keys(store)) == 5 == len(set(keys(store)))


async def test_a_restart_fires_nothing_twice_and_catches_up_as_configured() -> None:
    store, clock = InMemoryStore(), FakeClock(T0)
    config = settings(tick={"every": "2s", "overlap": "allow", "catch_up": "all"})
    before = make(store, clock, config)
    await before.load()
    clock.advance(4)
    await before.fire_due()  # 12:00:02 and 12:00:04
    clock.advance(7)  # down: 12:00:06, :08 and :10 missed
    after = make(store, clock, config)  # a new daemon process, same database
    await after.load()
    await after.fire_due()
    assert [k[-6:] for k in keys(store)] == [f"00:{s:02d}Z" for s in (2, 4, 6, 8, 10)]


@pytest.mark.parametrize(("catch_up", "made_up"), [("none", []), ("last", [10])])
async def test_after_a_downtime_catch_up_none_or_last(catch_up: str, made_up: list[int]) -> None:
    store, clock = InMemoryStore(), FakeClock(T0)
    config = settings(tick={"every": "2s", "overlap": "allow", "catch_up": catch_up})
    before = make(store, clock, config)
    await before.load()
    clock.advance(2)
    await before.fire_due()
    clock.advance(9)  # 12:00:11: :04 ... :10 missed
    after = make(store, clock, config)
    await after.load()
    await after.fire_due()
    clock.advance(1)  # 12:00:12 is on time
    await after.fire_due()
    assert [int(k[-3:-1]) for k in keys(store)] == [2, *made_up, 12]


async def test_a_first_start_fires_from_now_on() -> None:
    store, clock = InMemoryStore(), FakeClock(T0 + timedelta(seconds=0.5))
    schedules = make(store, clock, settings(tick={"every": "2s", "catch_up": "all"}))
    await schedules.load()
    await schedules.fire_due()
    assert keys(store) == []


# -- overlap -------------------------------------------------------------------------------------


async def test_overlap_skip_makes_no_dispatch_while_the_previous_one_runs() -> None:
    store, clock = InMemoryStore(), FakeClock(T0)
    counts = Counts()
    schedules = make(store, clock, settings(tick={"every": "2s"}), observer=counts)
    await schedules.load()
    clock.advance(2)
    await schedules.fire_due()
    clock.advance(2)
    await schedules.fire_due()  # the first is still queued: skipped
    finish_all(store)
    clock.advance(2)
    await schedules.fire_due()
    assert [k[-3:-1] for k in keys(store)] == ["02", "06"]
    assert counts.skipped == ["tick"]
    states = await store.schedule_states()
    assert states["tick"].last_fire == T0 + timedelta(seconds=6)
    assert states["tick"].last_dispatch_id == 2


async def test_overlap_queue_makes_a_dispatch_that_starts_after_the_previous_one() -> None:
    store, clock = InMemoryStore(), FakeClock(T0)
    schedules = make(store, clock, settings(tick={"every": "2s", "overlap": "queue"}))
    await schedules.load()
    clock.advance(2)
    await schedules.fire_due()
    clock.advance(2)
    await schedules.fire_due()
    assert store.dispatches[2].follows == 1
    claimed = await store.claim_many("i", clock.now(), (), 10)
    assert [d.id for d in claimed] == [1]  # the second waits for the first
    assert await store.claim_many("i", clock.now(), (), 10) == []
    store.finish_dispatch(1, DispatchStatus.FAILED, clock.now(), "boom")
    assert [d.id for d in await store.claim_many("i", clock.now(), (), 10)] == [2]


async def test_overlap_allow_lets_fires_run_side_by_side() -> None:
    store, clock = InMemoryStore(), FakeClock(T0)
    schedules = make(store, clock, settings(tick={"every": "2s", "overlap": "allow"}))
    await schedules.load()
    for _ in range(2):
        clock.advance(2)
        await schedules.fire_due()
    claimed = await store.claim_many("i", clock.now(), (), 10)
    assert [d.id for d in claimed] == [1, 2]


# -- reload --------------------------------------------------------------------------------------


async def test_a_reload_adds_changes_and_removes_schedules() -> None:
    store, clock = InMemoryStore(), FakeClock(T0)
    allow = {"overlap": "allow"}
    schedules = make(store, clock, settings(a={"every": "2s", **allow}, b={"every": "2s", **allow}))
    await schedules.load()
    clock.advance(2)
    await schedules.fire_due()
    schedules.reload(settings(a={"every": "5s", **allow}, c={"every": "3s", **allow}))
    await schedules._apply_reload()
    for _ in range(8):  # to 12:00:10, a second at a time
        clock.advance(1)
        await schedules.fire_due()
    assert sorted(schedules.active) == ["a", "c"]
    fired = [k.removeprefix("schedule:2026-06-01T12:") for k in keys(store)]
    assert [k.replace("2026-06-01T12:00:", "") for k in fired] == [
        "schedule:a:02Z",  # every 2s
        "schedule:a:05Z",  # every 5s from the reload on
        "schedule:a:10Z",
        "schedule:b:02Z",  # removed
        "schedule:c:03Z",  # added
        "schedule:c:06Z",
        "schedule:c:09Z",
    ]


async def test_metrics_count_fires_skips_and_the_lag() -> None:
    from dispatcher.metrics import DaemonMetrics

    store, clock = InMemoryStore(), FakeClock(T0)
    metrics = DaemonMetrics()
    schedules = make(store, clock, settings(tick={"every": "2s"}), observer=metrics)
    await schedules.load()
    for _ in range(2):
        clock.advance(2.5)
        await schedules.fire_due()
    text = metrics.render().decode()
    assert 'dispatcher_schedule_fires_total{schedule="tick"} 1.0' in text
    assert 'dispatcher_schedule_skips_total{schedule="tick"} 1.0' in text
    assert 'dispatcher_schedule_lag_seconds_sum{schedule="tick"} 0.5' in text
