"""The last hour of one daemon, minute by minute: dispatches finished (by status) and
the time from submit to start, for the status page's picture.

Kept in memory by the daemon that did the work (an `Observer`), so it costs no query
and starts empty with the daemon. Each minute keeps at most `SAMPLES_PER_MINUTE`
start delays (a uniform reservoir sample beyond that), so memory stays bounded at any
rate; p50 and p95 are read from those samples.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from dispatcher.clock import Clock

MINUTES = 60
SAMPLES_PER_MINUTE = 2000
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class _Bucket:
    start: datetime
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINAL, 0))
    starts: int = 0
    delays: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Minute:
    """One minute of the picture (`start` is the minute's first second, UTC)."""

    start: datetime
    finished: dict[str, int]
    starts: int
    p50: float | None
    p95: float | None

    @property
    def total(self) -> int:
        return sum(self.finished.values())


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (`share` in 0..1) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


class Activity:
    """Counts what the pipeline reports; `minutes()` answers the last hour."""

    def __init__(self, clock: Clock, rand: random.Random | None = None) -> None:
        self._clock = clock
        self._rand = rand or random.Random()
        self._buckets: deque[_Bucket] = deque(maxlen=MINUTES)

    def _bucket(self) -> _Bucket:
        start = self._clock.now().replace(second=0, microsecond=0)
        if not self._buckets or self._buckets[-1].start < start:
            self._buckets.append(_Bucket(start))
        return self._buckets[-1]

    # -- Observer ---------------------------------------------------------------------------

    def dispatch_started(self, task: str, waited_s: float) -> None:
        """A dispatch started for the first time, `waited_s` after it was submitted."""
        bucket = self._bucket()
        bucket.starts += 1
        if len(bucket.delays) < SAMPLES_PER_MINUTE:
            bucket.delays.append(waited_s)
        else:  # reservoir sampling: every start of the minute equally likely kept
            slot = self._rand.randrange(bucket.starts)
            if slot < SAMPLES_PER_MINUTE:
                bucket.delays[slot] = waited_s

    def dispatch_finished(self, task: str, status: str) -> None:
        bucket = self._bucket()
        bucket.finished[status] = bucket.finished.get(status, 0) + 1

    def attempt_finished(self, runner: str, status: str, duration_s: float) -> None:
        """Not part of the picture."""

    def purge_finished(self, deleted: int, duration_s: float) -> None:
        """Not part of the picture."""

    def schedule_fired(self, schedule: str, lag_s: float) -> None:
        """Not part of the picture."""

    def schedule_skipped(self, schedule: str) -> None:
        """Not part of the picture."""

    # -- reading ----------------------------------------------------------------------------

    def minutes(self) -> list[Minute]:
        """The last `MINUTES` minutes, oldest first, the current one last (empty minutes
        included, so the picture's time axis is even)."""
        now = self._clock.now().replace(second=0, microsecond=0)
        known = {bucket.start: bucket for bucket in self._buckets}
        answer = []
        for back in range(MINUTES - 1, -1, -1):
            start = now - timedelta(minutes=back)
            bucket = known.get(start) or _Bucket(start)
            answer.append(
                Minute(
                    start=start,
                    finished=dict(bucket.finished),
                    starts=bucket.starts,
                    p50=percentile(bucket.delays, 0.50),
                    p95=percentile(bucket.delays, 0.95),
                )
            )
        return answer
