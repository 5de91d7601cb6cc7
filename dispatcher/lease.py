"""This daemon's lease on a shared database: renewed by heartbeats, fenced before the TTL.

On PostgreSQL several daemons share the work. A daemon silent for longer than
`daemon.instance_ttl` is reaped by any other: its slots are freed, its attempts
interrupted, its dispatches requeued, and its instance row is marked stopped. From
then on every write it makes about that work is refused (the store's fence), and its
heartbeat fails: it has lost its lease.

A daemon must not be running steps when another may reap them. So it fences itself:
once its lease has not been renewed for `fence_after` seconds, a margin before the TTL,
it ends its running steps and claims nothing until a heartbeat renews the lease again
(or finds it lost). The margin leaves room for the steps to die and for the hosts'
clocks to disagree by a little (keep them in step with NTP).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

MIN_MARGIN = 1.0
"""Seconds, at least, between the self-fence and the TTL."""


def fence_after(ttl: float) -> float:
    """Seconds without a renewed lease after which a daemon ends its steps itself."""
    return ttl - max(MIN_MARGIN, 0.2 * ttl)


class LeaseState(Enum):
    HELD = "held"
    FENCED = "fenced"
    """Not renewed for `fence_after`: steps ended, nothing claimed, until renewed."""
    LOST = "lost"
    """Taken by another daemon: rejoin as a new instance."""


class Lease:
    """When the lease was last renewed, and what that means now."""

    def __init__(self, ttl: float, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.fence_after = fence_after(ttl)
        self.renewed_at = now()
        self.state = LeaseState.HELD

    def renewed(self, sent_at: float) -> bool:
        """A heartbeat sent at `sent_at` (monotonic) went through; answers whether this
        ends a self-fence."""
        self.renewed_at = max(self.renewed_at, sent_at)
        ended = self.state is LeaseState.FENCED
        if self.state is not LeaseState.LOST:
            self.state = LeaseState.HELD
        return ended

    def silent_for(self) -> float:
        return self._now() - self.renewed_at

    def due_for_fence(self) -> bool:
        """Held, but not renewed for `fence_after`: time to end the steps."""
        return self.state is LeaseState.HELD and self.silent_for() > self.fence_after

    def fence(self) -> None:
        self.state = LeaseState.FENCED

    def lose(self) -> bool:
        """The lease is gone; answers whether this is news."""
        news = self.state is not LeaseState.LOST
        self.state = LeaseState.LOST
        return news

    def restart(self) -> None:
        """A new instance holds a new lease, renewed now."""
        self.state = LeaseState.HELD
        self.renewed_at = self._now()

    @property
    def may_claim(self) -> bool:
        return self.state is LeaseState.HELD
