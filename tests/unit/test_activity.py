"""The last hour, minute by minute (fake clock), and its picture."""

from __future__ import annotations

import random
import re

from dispatcher import activity, statuspage
from dispatcher.activity import Activity, percentile
from dispatcher.testing import FakeClock


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([], 0.5) is None


def test_minutes_count_finishes_by_status_and_start_delays() -> None:
    clock = FakeClock()
    recent = Activity(clock)
    recent.dispatch_started("t", 1.0)
    recent.dispatch_started("t", 3.0)
    recent.dispatch_finished("t", "succeeded")
    clock.advance(60)
    recent.dispatch_finished("t", "failed")
    recent.dispatch_finished("t", "cancelled")
    minutes = recent.minutes()
    assert len(minutes) == activity.MINUTES
    before, now = minutes[-2], minutes[-1]
    assert (before.finished["succeeded"], before.starts, before.p50, before.p95) == (1, 2, 1.0, 3.0)
    assert (now.finished["failed"], now.finished["cancelled"], now.p50) == (1, 1, None)
    assert now.start == clock.now().replace(second=0, microsecond=0)


def test_an_hour_later_the_old_minutes_are_gone() -> None:
    clock = FakeClock()
    recent = Activity(clock)
    recent.dispatch_finished("t", "succeeded")
    clock.advance(3600)
    assert sum(m.total for m in recent.minutes()) == 0


def test_a_busy_minute_keeps_a_bounded_sample() -> None:
    recent = Activity(FakeClock(), random.Random(1))
    for n in range(activity.SAMPLES_PER_MINUTE * 3):
        recent.dispatch_started("t", float(n % 100))
    minute = recent.minutes()[-1]
    assert minute.starts == activity.SAMPLES_PER_MINUTE * 3
    assert minute.p50 is not None and 40 <= minute.p50 <= 60  # still a fair sample


def test_the_picture_is_inline_svg_with_one_bar_a_minute() -> None:
    clock = FakeClock()
    recent = Activity(clock)
    recent.dispatch_started("t", 0.25)
    recent.dispatch_finished("t", "succeeded")
    minutes = recent.minutes()
    finished = statuspage.finished_chart(minutes)
    assert finished.startswith("<svg") and finished.count('<g class="minute"') == 60
    assert 'data-succeeded="1"' in finished
    latency = statuspage.latency_chart(minutes)
    assert re.search(r'data-p50="0\.250000" data-p95="0\.250000"', latency)
    assert "<script" not in finished + latency
