"""Retry policy: pure functions from a step's history to a decision."""

from __future__ import annotations

import random
from dataclasses import dataclass

from dispatcher.models import (
    SHUTDOWN_INTERRUPTION,
    Attempt,
    AttemptStatus,
    Step,
    is_resource_shortage,
)

FAILURE_STATUSES = frozenset({AttemptStatus.FAILED, AttemptStatus.TIMED_OUT})

SHORTAGE_BACKOFF = 1.0
SHORTAGE_BACKOFF_MAX = 60.0
"""A step that could not start for lack of a resource waits 1 s, 2 s, 4 s ... up to a
minute (with jitter) before its next try, whatever its own backoff says."""


def backoff_delay(failures: int, base: float, cap: float, rand: random.Random) -> float:
    """Exponential backoff with jitter: half the delay is fixed, half is random.

    `failures` counts the failed attempts so far (1 after the first failure), so the
    delays grow base, 2*base, 4*base, ... up to `cap`. The random half spreads
    retries of many dispatches that failed together.
    """
    ceiling = min(cap, base * float(2 ** max(failures - 1, 0)))
    return ceiling / 2 + rand.uniform(0, ceiling / 2)


@dataclass(frozen=True, slots=True)
class StepHistory:
    """What earlier attempts of one step say about the next one."""

    attempts: int
    failures: int
    interruptions: int
    """Attempts cut short by a daemon crash; a graceful shutdown does not count, nor
    does a resource shortage."""
    succeeded: bool = False
    """An attempt already succeeded (the daemon died before it recorded the advance)."""
    shortages: int = 0
    """Attempts that could not start for lack of a resource (`RESOURCE_SHORTAGE`)."""

    @classmethod
    def of(cls, attempts: list[Attempt], series: int = 0) -> StepHistory:
        """The history of one step. Attempts are numbered on across series; failures,
        interruptions and shortages count only in the current `series` (a `retry`
        gives the step its retries again)."""
        if not attempts:  # a step's first attempt: nearly every one
            return _FIRST
        current = [a for a in attempts if a.series == series]
        shortages = sum(1 for a in current if is_resource_shortage(a.status, a.error))
        return cls(
            succeeded=any(a.status is AttemptStatus.SUCCEEDED for a in attempts),
            attempts=len(attempts),
            failures=sum(1 for a in current if a.status in FAILURE_STATUSES),
            interruptions=sum(
                1
                for a in current
                if a.status is AttemptStatus.INTERRUPTED and a.error != SHUTDOWN_INTERRUPTION
            )
            - shortages,
            shortages=shortages,
        )

    @property
    def next_attempt(self) -> int:
        return self.attempts + 1


_FIRST = StepHistory(attempts=0, failures=0, interruptions=0)


def may_retry(step: Step, failures: int) -> bool:
    """After `failures` failed attempts, is another attempt allowed?"""
    return failures <= step.retries
