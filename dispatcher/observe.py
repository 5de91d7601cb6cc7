"""What the daemon reports as it works, for whoever counts it (the metrics).

The pipeline and the maintenance jobs call an `Observer`; they never import
prometheus. `NullObserver` is the default when nobody listens.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    """Callbacks made on the daemon's event loop; they must be quick and never raise."""

    def dispatch_started(self, task: str, waited_s: float) -> None:
        """A dispatch started for the first time, `waited_s` seconds after its submit."""
        ...

    def dispatch_finished(self, task: str, status: str) -> None:
        """A dispatch reached a final status (`succeeded`, `failed`, `cancelled`)."""
        ...

    def attempt_finished(self, runner: str, status: str, duration_s: float) -> None:
        """One attempt (a step, or an external planner) ended with `status`."""
        ...

    def purge_finished(self, deleted: int, duration_s: float) -> None:
        """One run of the purge job deleted `deleted` gate rows in `duration_s` seconds."""
        ...

    def schedule_fired(self, schedule: str, lag_s: float) -> None:
        """A fire of `schedule` made its dispatch `lag_s` seconds after its fire time."""
        ...

    def schedule_skipped(self, schedule: str) -> None:
        """A fire of `schedule` made no dispatch: the previous one had not ended."""
        ...


class NullObserver:
    """Observes nothing."""

    def dispatch_started(self, task: str, waited_s: float) -> None:
        """Ignored."""

    def dispatch_finished(self, task: str, status: str) -> None:
        """Ignored."""

    def attempt_finished(self, runner: str, status: str, duration_s: float) -> None:
        """Ignored."""

    def purge_finished(self, deleted: int, duration_s: float) -> None:
        """Ignored."""

    def schedule_fired(self, schedule: str, lag_s: float) -> None:
        """Ignored."""

    def schedule_skipped(self, schedule: str) -> None:
        """Ignored."""


class Observers:
    """Several observers as one: each callback goes to every one, in order."""

    def __init__(self, *observers: Observer) -> None:
        self._observers = observers

    def dispatch_started(self, task: str, waited_s: float) -> None:
        """Passed on to each."""
        for observer in self._observers:
            observer.dispatch_started(task, waited_s)

    def dispatch_finished(self, task: str, status: str) -> None:
        """Passed on to each."""
        for observer in self._observers:
            observer.dispatch_finished(task, status)

    def attempt_finished(self, runner: str, status: str, duration_s: float) -> None:
        """Passed on to each."""
        for observer in self._observers:
            observer.attempt_finished(runner, status, duration_s)

    def purge_finished(self, deleted: int, duration_s: float) -> None:
        """Passed on to each."""
        for observer in self._observers:
            observer.purge_finished(deleted, duration_s)

    def schedule_fired(self, schedule: str, lag_s: float) -> None:
        """Passed on to each."""
        for observer in self._observers:
            observer.schedule_fired(schedule, lag_s)

    def schedule_skipped(self, schedule: str) -> None:
        """Passed on to each."""
        for observer in self._observers:
            observer.schedule_skipped(schedule)
