"""Schedules: `[schedules.NAME]` fired as dispatches, exactly once per fire time.

A schedule's fire times come from an APScheduler 3 trigger (`cron` in the schedule's
`timezone`, or `every`, aligned to the Unix epoch in UTC so that every daemon computes
the same times). Each fire is a dispatch keyed `schedule:NAME:<fire time, ISO-8601
UTC>`; `Store.fire_schedule` handles a fire in one transaction, serialized per schedule
across daemons, so a fire makes one dispatch however many daemons fire it, and a
restart never fires again what was handled before it.

Timing: one APScheduler job per schedule, on the daemon's own scheduler and loop,
only says "a fire is due"; the work happens in `Schedules.run`, a side task of the
daemon's task group, which fires everything due for each schedule since its cursor:

- a fire late by at most `MISFIRE_GRACE` is on time and fires;
- older ones were missed (the daemon was down, the host asleep) and follow the
  schedule's `catch_up`: `none` fires none of them, `last` the latest, `all` the latest
  `catch_up_limit`;
- each fire then meets the schedule's `overlap` policy (see `Store.fire_schedule`).

Daylight saving time (`cron` in a zone that has it): a wall time that does not exist
(spring) fires once, an hour later by the clock (02:30 -> 03:30); a wall time that
occurs twice (autumn) fires once, at its first occurrence, unless the hour field is
`*`: such a schedule follows real time through the repeated hour (as cronie does).
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import anyio

from dispatcher import logs
from dispatcher.clock import Clock
from dispatcher.config import ScheduleSettings, Settings
from dispatcher.errors import DispatcherError
from dispatcher.models import FireOutcome, NewDispatch
from dispatcher.observe import NullObserver, Observer
from dispatcher.store.base import Store

if TYPE_CHECKING:  # APScheduler is imported where it is used: most CLI commands never are
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.base import BaseTrigger
    from apscheduler.triggers.cron import CronTrigger

log = logs.get_logger("dispatcher.schedules")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MISFIRE_GRACE = 1.0
"""Seconds a fire may be late and still count as on time (a busy loop, a slow
database); an older one was missed and follows the schedule's `catch_up`."""
EARLY = 0.05
"""A fire due within this many seconds is waited for rather than left to the next
wake-up (the scheduler's timer may go off a little early)."""
RETRY_AFTER = 1.0
"""Seconds before fires that failed (the database busy or down) are tried again."""
MAX_SKIPS = 1000
"""Candidate times a search may pass over (daylight saving slips) before it gives up."""
KEY_TIME = "%Y-%m-%dT%H:%M:%SZ"


# -- fire times: pure ------------------------------------------------------------------------


_CRON_DAYS = 7
"""Standard cron numbers the days of the week 0-7, Sunday being both 0 and 7."""


def cron_day_of_week(field_text: str) -> str:
    """A crontab day-of-week field in APScheduler 3's numbering (Monday = 0) instead of
    the standard one (Sunday = 0 or 7), as a list of numbers; names pass unchanged.

    `ValueError` for a part that is not a number, a range or a step of them.
    """
    if field_text == "*" or any(c.isalpha() for c in field_text):
        return field_text
    days: set[int] = set()
    for part in field_text.split(","):
        days |= _cron_days(part)
    return ",".join(str((day - 1) % _CRON_DAYS) for day in sorted(days))


def _cron_days(part: str) -> set[int]:
    """Standard cron day numbers (0-7) of one part of the field: `*`, `N`, `A-B`, with
    an optional `/STEP`."""
    span, _, step_text = part.partition("/")
    step = int(step_text) if step_text else 1
    if span == "*":
        first, last = 0, _CRON_DAYS - 1
    elif "-" in span:
        start, _, end = span.partition("-")
        first, last = int(start), int(end)
    else:
        first = int(span)
        last = _CRON_DAYS if step_text else first
    if not (0 <= first <= _CRON_DAYS and 0 <= last <= _CRON_DAYS and first <= last and step > 0):
        raise ValueError(f"invalid day of week {part!r} (0-7, Sunday is 0 or 7)")
    return set(range(first, last + 1, step))


def cron_trigger(expression: str, timezone: str) -> CronTrigger:
    """A five-field crontab expression as a trigger in `timezone`, with standard cron's
    days of the week; `ValueError` naming what is wrong."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields (minute hour day month weekday), got {len(fields)}")
    if fields[2] != "*" and fields[4] != "*":
        raise ValueError(
            "restrict the day of the month or the day of the week, not both (cron "
            "implementations disagree on what that means)"
        )
    fields[4] = cron_day_of_week(fields[4])
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(" ".join(fields), timezone=ZoneInfo(timezone))


class FireTimes:
    """The fire times of one schedule, in UTC, whole seconds, strictly increasing."""

    def __init__(self, spec: ScheduleSettings) -> None:
        self.trigger: BaseTrigger
        self._zone: ZoneInfo | None = None
        self._hourly = False
        if spec.cron is not None:
            self._zone = ZoneInfo(spec.timezone or "UTC")
            cron = cron_trigger(spec.cron, spec.timezone or "UTC")
            self._hourly = str(next(f for f in cron.fields if f.name == "hour")) == "*"
            self.trigger = cron
        else:
            assert spec.every is not None, "a schedule has cron or every"
            from apscheduler.triggers.interval import IntervalTrigger

            self.trigger = IntervalTrigger(seconds=int(spec.every), start_date=EPOCH, timezone=UTC)

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire strictly after `after`; None when there is none (`0 0 30 2 *`)."""
        probe = after
        for _ in range(MAX_SKIPS):
            found: datetime | None = self.trigger.get_next_fire_time(
                None, probe + timedelta(microseconds=1)
            )
            if found is None:
                return None
            at: datetime = found.astimezone(UTC)
            if at <= probe:  # APScheduler 3 slips back across a DST change: step on
                probe += timedelta(seconds=1)
                continue
            if self._repeated_wall_time(found):
                probe = at
                continue
            return at
        return None

    def _repeated_wall_time(self, found: datetime) -> bool:
        """`found` is the second occurrence of a wall time (autumn), and the schedule
        names its hours: it fired at the first occurrence already."""
        if self._zone is None or self._hourly:
            return False
        wall = found.replace(tzinfo=None)
        first = wall.replace(tzinfo=self._zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self._zone, fold=1).astimezone(UTC)
        return first < second and found.astimezone(UTC) == second

    def between(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """Fires in (`after`, `until`], the first `limit` of them."""
        fires: list[datetime] = []
        at = self.next_after(after)
        while at is not None and at <= until and len(fires) < limit:
            fires.append(at)
            at = self.next_after(at)
        return fires

    def latest(self, after: datetime, until: datetime, count: int) -> list[datetime]:
        """The last `count` fires in (`after`, `until`], oldest first. Looks back from
        `until` in growing windows, so a long downtime is not walked fire by fire."""
        if count <= 0:
            return []
        window = timedelta(minutes=1)
        while True:
            start = max(after, until - window)
            kept: deque[datetime] = deque(maxlen=count)
            found = 0
            at = self.next_after(start)
            while at is not None and at <= until:
                kept.append(at)
                found += 1
                at = self.next_after(at)
            if found >= count or start == after:
                return list(kept)
            window *= 4


def fire_key(schedule: str, at: datetime) -> str:
    """The idempotency key of one fire: `schedule:NAME:2026-03-29T01:30:00Z`."""
    return f"schedule:{schedule}:{at.astimezone(UTC).strftime(KEY_TIME)}"


@dataclass(frozen=True, slots=True)
class Due:
    """What to fire now for one schedule."""

    fires: list[datetime]
    """Oldest first: the missed fires the catch-up keeps, then those on time."""
    missed: int
    """Fires older than `MISFIRE_GRACE` found (counted up to `catch_up_limit` + 1)."""
    caught_up: int
    """How many of the missed fires are in `fires`."""


def due_fires(times: FireTimes, cursor: datetime, now: datetime, catch_up: str, limit: int) -> Due:
    """The fires after `cursor` up to `now`, by the catch-up policy (module docstring)."""
    grace_start = max(cursor, now - timedelta(seconds=MISFIRE_GRACE))
    on_time = times.between(grace_start, now, limit=limit)
    missed = times.latest(cursor, grace_start, limit + 1) if grace_start > cursor else []
    kept = {"none": 0, "last": 1}.get(catch_up, limit)
    caught = missed[-kept:] if kept else []
    return Due(caught + on_time, len(missed), len(caught))


# -- the runtime -------------------------------------------------------------------------------


@functools.cache
def _trigger_class() -> type[BaseTrigger]:
    from apscheduler.triggers.base import BaseTrigger

    class _Trigger(BaseTrigger):  # type: ignore[misc]  # APScheduler ships no type hints
        """`FireTimes` as APScheduler's trigger, so its timer goes off at our fire times."""

        def __init__(self, times: FireTimes) -> None:
            self.times = times

        def get_next_fire_time(
            self, previous_fire_time: datetime | None, now: datetime
        ) -> datetime | None:
            after = now - timedelta(microseconds=1)
            if previous_fire_time is not None:
                after = max(after, previous_fire_time)
            return self.times.next_after(after)

    return _Trigger


@dataclass
class _Active:
    """A configured schedule as the daemon runs it."""

    name: str
    spec: ScheduleSettings
    times: FireTimes
    cursor: datetime
    """Fires up to this time are handled (or were let go by the catch-up policy)."""


NewFor = Callable[[str, ScheduleSettings, datetime], NewDispatch]
"""The dispatch of one fire: (schedule name, its settings, fire time) -> validated."""


@dataclass
class Schedules:
    """Fires the configured schedules; `run` is a side task of the daemon."""

    settings: Settings
    store: Store
    clock: Clock
    new_dispatch: NewFor
    observer: Observer = field(default_factory=NullObserver)
    on_dispatched: Callable[[], None] = lambda: None
    """Told when a fire made a dispatch (the daemon claims at once)."""
    active: dict[str, _Active] = field(default_factory=dict)
    _due: asyncio.Event = field(default_factory=asyncio.Event)
    _reloaded: Settings | None = None
    """A configuration from a SIGHUP, applied by `run` at its next turn."""
    _scheduler: AsyncIOScheduler | None = None
    _failing: bool = False

    # -- lifecycle ---------------------------------------------------------------------

    async def load(self) -> None:
        """Each configured schedule, its cursor where the database says it fired last
        (missed fires are then due: the catch-up policy applies) or now (first run)."""
        states = await self.store.schedule_states() if self.settings.schedules else {}
        now = self.clock.now()
        for name, spec in sorted(self.settings.schedules.items()):
            state = states.get(name)
            cursor = state.last_fire if state is not None and state.last_fire else now
            self.active[name] = _Active(name, spec, FireTimes(spec), min(cursor, now))
        if self.active:
            log.info("schedules_loaded", schedules=sorted(self.active))

    async def run(
        self,
        scheduler: AsyncIOScheduler,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Load, add one APScheduler job per schedule, and fire what is due whenever a
        job says so, until cancelled (the jobs are removed then)."""
        self._scheduler = scheduler
        loaded = False
        try:
            task_status.started()
            while True:
                if not loaded:
                    loaded = await self._try_load()
                if loaded:
                    await self._apply_reload()
                    wait = await self.fire_due()
                    if wait is not None and wait <= EARLY:
                        await self.clock.sleep(wait)
                        continue
                idle = RETRY_AFTER if self._failing or not loaded else None
                with anyio.move_on_after(idle):
                    await self._due.wait()
                self._due.clear()
        finally:
            for name in list(self.active):
                self._remove_job(name)

    async def _try_load(self) -> bool:
        try:
            await self.load()
        except DispatcherError as exc:
            log.warning("schedules_load_failed", error=str(exc), retry_s=RETRY_AFTER)
            return False
        for item in self.active.values():
            self._add_job(item)
        return True

    def reload(self, settings: Settings) -> None:
        """Apply a reloaded configuration (from the signal handler): the fires due under
        the old one go first, then schedules are added, changed and removed."""
        self._reloaded = settings
        self._due.set()

    async def _apply_reload(self) -> None:
        settings, self._reloaded = self._reloaded, None
        if settings is None:
            return
        await self.fire_due()  # what was due under the old configuration
        now = self.clock.now()
        old, new = self.settings.schedules, settings.schedules
        self.settings = settings
        removed = sorted(set(old) - set(new))
        added = sorted(set(new) - set(old))
        changed = sorted(name for name in set(old) & set(new) if old[name] != new[name])
        for name in removed:
            self._remove_job(name)
            del self.active[name]
        for name in added + changed:
            # From now on: a changed or new schedule has missed nothing.
            cursor = self.active[name].cursor if name in self.active else now
            item = _Active(name, new[name], FireTimes(new[name]), max(cursor, now))
            self.active[name] = item
            self._remove_job(name)
            self._add_job(item)
        if removed or added or changed:
            log.info("schedules_reloaded", added=added, changed=changed, removed=removed)

    def _add_job(self, item: _Active) -> None:
        if self._scheduler is None:
            return
        self._scheduler.add_job(
            self._tick,
            _trigger_class()(item.times),
            id=f"schedule:{item.name}",
            name=f"schedule:{item.name}",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )

    def _remove_job(self, name: str) -> None:
        if self._scheduler is not None and self._scheduler.get_job(f"schedule:{name}"):
            self._scheduler.remove_job(f"schedule:{name}")

    async def _tick(self) -> None:
        """The APScheduler job: a fire is due (it runs as a task on the daemon's loop)."""
        self._due.set()

    # -- firing ------------------------------------------------------------------------

    async def fire_due(self) -> float | None:
        """Fire what is due for every schedule; answer the seconds until the next fire
        (None: no schedule will fire)."""
        self._failing = False
        now = self.clock.now()
        for item in list(self.active.values()):
            try:
                await self._fire_schedule(item, now)
            except DispatcherError as exc:  # the database busy or down: the cursor stays
                self._failing = True
                log.warning("schedule_fire_failed", schedule=item.name, error=str(exc))
        upcoming = [item.times.next_after(item.cursor) for item in self.active.values()]
        times = [at for at in upcoming if at is not None]
        return max(0.0, (min(times) - self.clock.now()).total_seconds()) if times else None

    async def _fire_schedule(self, item: _Active, now: datetime) -> None:
        spec = item.spec
        due = due_fires(item.times, item.cursor, now, spec.catch_up, spec.catch_up_limit)
        if due.missed:
            log.warning(
                "schedule_missed",
                schedule=item.name,
                missed=due.missed if due.missed <= spec.catch_up_limit else "more",
                fired=due.caught_up,
                catch_up=spec.catch_up,
            )
        for at in due.fires:
            await self._fire(item, at)
            item.cursor = at
        item.cursor = max(item.cursor, now)

    async def _fire(self, item: _Active, at: datetime) -> None:
        new = self.new_dispatch(item.name, item.spec, at)
        fired = await self.store.fire_schedule(
            item.name, at, new, item.spec.overlap, self.clock.now()
        )
        fire_time = at.strftime(KEY_TIME)
        if fired.outcome is FireOutcome.DISPATCHED:
            lag = (self.clock.now() - at).total_seconds()
            self.observer.schedule_fired(item.name, lag)
            log.info(
                "schedule_fired",
                schedule=item.name,
                fire_time=fire_time,
                dispatch_id=fired.dispatch_id,
                lag_ms=round(lag * 1000),
            )
            self.on_dispatched()
        elif fired.outcome is FireOutcome.SKIPPED:
            self.observer.schedule_skipped(item.name)
            log.info(
                "schedule_skipped",
                schedule=item.name,
                fire_time=fire_time,
                unfinished_dispatch_id=fired.dispatch_id,
                overlap=item.spec.overlap,
            )
        else:  # another daemon (or this one before a restart) handled it
            log.debug("schedule_fire_seen", schedule=item.name, fire_time=fire_time)


def next_fires(settings: Settings, now: datetime) -> Mapping[str, datetime | None]:
    """Each configured schedule's next fire after `now`."""
    return {name: FireTimes(spec).next_after(now) for name, spec in settings.schedules.items()}
