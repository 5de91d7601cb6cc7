"""Prometheus metrics of one daemon, on its own registry (never the global one).

Counters and histograms are fed through the `Observer` callbacks (the pipeline and
the purge job call them); gauges of live state (gates, queue, in-flight) are read at
scrape time by a custom collector.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import anyio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dispatcher.gate import GateState
from dispatcher.models import DispatchStatus

CONTENT_TYPE = CONTENT_TYPE_LATEST
LAG_INTERVAL = 0.5
"""Seconds between two event-loop lag measurements."""

ATTEMPT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, float("inf"))
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 60, 3600, float("inf"))
PURGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, float("inf"))


@dataclass
class LiveSources:
    """Where the scrape-time gauges read from (the daemon's gate and state)."""

    gates: Callable[[], list[GateState]]
    inflight: Callable[[], int]


class _LiveCollector(Collector):
    """Gates, queue depth and in-flight count, as they are when scraped."""

    def __init__(self) -> None:
        self.sources: LiveSources | None = None
        self.queue: Mapping[DispatchStatus, int] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        capacity = GaugeMetricFamily(
            "dispatcher_gate_capacity", "Places in the gate.", labels=["gate"]
        )
        held = GaugeMetricFamily("dispatcher_gate_held", "Places held now.", labels=["gate"])
        waiting = GaugeMetricFamily(
            "dispatcher_gate_waiting", "Tasks waiting for a place.", labels=["gate"]
        )
        for gate in self.sources.gates() if self.sources else []:
            capacity.add_metric([gate.name], gate.capacity)
            held.add_metric([gate.name], gate.held)
            waiting.add_metric([gate.name], gate.waiting)
        queue = GaugeMetricFamily(
            "dispatcher_dispatches", "Dispatches in the database by status.", labels=["status"]
        )
        for status in DispatchStatus:
            queue.add_metric([str(status)], self.queue.get(status, 0))
        inflight = GaugeMetricFamily(
            "dispatcher_inflight_dispatches", "Dispatches this daemon is planning or running."
        )
        inflight.add_metric([], self.sources.inflight() if self.sources else 0)
        yield from (capacity, held, waiting, queue, inflight)


class DaemonMetrics:
    """Every metric of one daemon; implements `dispatcher.observe.Observer`.

    Hook for the purge job: `observe_purge(deleted, duration_s)` (or the Observer
    name `purge_finished`) after each run counts the run, the rows deleted and the
    run's duration.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.dispatches_finished = Counter(
            "dispatcher_dispatches_finished",
            "Dispatches that reached a final status.",
            ["task", "status"],
            registry=reg,
        )
        self.attempts = Counter(
            "dispatcher_attempts",
            "Attempts ended, by runner and status.",
            ["runner", "status"],
            registry=reg,
        )
        self.attempt_duration = Histogram(
            "dispatcher_attempt_duration_seconds",
            "How long attempts ran, by runner.",
            ["runner"],
            buckets=ATTEMPT_BUCKETS,
            registry=reg,
        )
        self.start_delay = Histogram(
            "dispatcher_dispatch_start_delay_seconds",
            "Time from submit to a dispatch's first start, by task.",
            ["task"],
            buckets=ATTEMPT_BUCKETS,
            registry=reg,
        )
        self.purge_runs = Counter("dispatcher_purge_runs", "Runs of the purge job.", registry=reg)
        self.purge_rows = Counter(
            "dispatcher_purge_rows_deleted", "Released gate rows deleted by purge.", registry=reg
        )
        self.purge_duration = Histogram(
            "dispatcher_purge_duration_seconds",
            "How long a purge run took.",
            buckets=PURGE_BUCKETS,
            registry=reg,
        )
        self.loop_lag = Gauge(
            "dispatcher_event_loop_lag_seconds",
            "How late the last loop tick woke up (a blocked loop shows here).",
            registry=reg,
        )
        self.start_time = Gauge(
            "dispatcher_instance_start_time_seconds",
            "When this daemon instance started (Unix time).",
            registry=reg,
        )
        self.info = Gauge(
            "dispatcher_instance_info",
            "This instance: id and version.",
            ["instance_id", "version"],
            registry=reg,
        )
        self.schedule_fires = Counter(
            "dispatcher_schedule_fires",
            "Fires of a schedule that made a dispatch (by this daemon).",
            ["schedule"],
            registry=reg,
        )
        self.schedule_skips = Counter(
            "dispatcher_schedule_skips",
            "Fires of a schedule that made no dispatch: the previous one had not ended.",
            ["schedule"],
            registry=reg,
        )
        self.schedule_lag = Histogram(
            "dispatcher_schedule_lag_seconds",
            "Time from a fire's scheduled time to its dispatch, by schedule.",
            ["schedule"],
            buckets=LAG_BUCKETS,
            registry=reg,
        )
        self.http_requests = Counter(
            "dispatcher_http_requests",
            "HTTP requests served.",
            ["method", "route", "status"],
            registry=reg,
        )
        self.last_loop_lag = 0.0
        self._live = _LiveCollector()
        reg.register(self._live)

    # -- wiring ------------------------------------------------------------------------

    def watch(self, sources: LiveSources, instance_id: str, version: str) -> None:
        """Read live gauges from `sources` from now on; stamp the start time."""
        self._live.sources = sources
        self.start_time.set(time.time())
        self.info.labels(instance_id, version).set(1)

    def set_queue(self, counts: Mapping[DispatchStatus, int]) -> None:
        """The queue depth by status, as just read from the store."""
        self._live.queue = dict(counts)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    async def measure_loop_lag(self, interval: float = LAG_INTERVAL) -> None:
        """Forever: sleep `interval`, record how much later than asked the loop woke."""
        while True:
            asked = anyio.current_time()
            await anyio.sleep(interval)
            self.last_loop_lag = max(0.0, anyio.current_time() - asked - interval)
            self.loop_lag.set(self.last_loop_lag)

    # -- Observer -----------------------------------------------------------------------

    def dispatch_started(self, task: str, waited_s: float) -> None:
        """Observe how long a dispatch waited from submit to its first start."""
        self.start_delay.labels(task).observe(max(0.0, waited_s))

    def dispatch_finished(self, task: str, status: str) -> None:
        """Count a dispatch that reached a final status."""
        self.dispatches_finished.labels(task, status).inc()

    def attempt_finished(self, runner: str, status: str, duration_s: float) -> None:
        """Count an attempt and its duration."""
        self.attempts.labels(runner, status).inc()
        self.attempt_duration.labels(runner).observe(max(0.0, duration_s))

    def purge_finished(self, deleted: int, duration_s: float) -> None:
        """Count a purge run, its deleted rows and its duration."""
        self.purge_runs.inc()
        self.purge_rows.inc(deleted)
        self.purge_duration.observe(max(0.0, duration_s))

    def schedule_fired(self, schedule: str, lag_s: float) -> None:
        """Count a fire that made its dispatch, and its lag."""
        self.schedule_fires.labels(schedule).inc()
        self.schedule_lag.labels(schedule).observe(max(0.0, lag_s))

    def schedule_skipped(self, schedule: str) -> None:
        """Count a fire skipped by the overlap policy."""
        self.schedule_skips.labels(schedule).inc()

    observe_purge = purge_finished
