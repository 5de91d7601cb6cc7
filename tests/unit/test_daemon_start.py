"""What the daemon does beside its dispatch loop: the orphan guard at start, and the
self-check of a live daemon, which puts back what it marked in flight but does not run
(a write lost before it could be retried, a claim whose start failed): the repair that
recovery does at start, without a restart."""

from __future__ import annotations

import asyncio
import gc
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatcher import daemon as daemon_module
from dispatcher import store as store_package
from dispatcher.config import load_settings
from dispatcher.daemon import Daemon
from dispatcher.models import DispatchStatus, NewDispatch
from dispatcher.pipeline import InFlight
from dispatcher.runners.orphan_guard import GuardError
from dispatcher.systemd import Notifier
from dispatcher.testing import FakeClock, InMemoryStore

NOOP_ONLY = """
[database]
path = "d.db"
[runners.noop]
type = "noop"
[tasks.n]
steps = [{ name = "a", runner = "noop" }]
"""

WITH_PYTHON = (
    NOOP_ONLY
    + """
[runners.py]
type = "python"
"""
)


class FakeGuard:
    def __init__(self, error: GuardError | None = None) -> None:
        self.error = error
        self.starts = 0
        self.pid = None

    def start(self) -> None:
        self.starts += 1
        if self.error is not None:
            raise self.error


def daemon_on(
    tmp_path: Path, text: str, store: InMemoryStore | None = None, clock: FakeClock | None = None
) -> Daemon:
    config = tmp_path / "dispatcher.toml"
    config.write_text(text)
    return Daemon(load_settings(config, {}), store or InMemoryStore(), clock=clock)


@pytest.mark.parametrize(("text", "starts"), [(NOOP_ONLY, 0), (WITH_PYTHON, 1)])
def test_the_guard_starts_with_the_daemon_only_when_steps_may_start_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, starts: int
) -> None:
    guard = FakeGuard()
    monkeypatch.setattr(daemon_module, "process_guard", lambda: guard)

    daemon_on(tmp_path, text)._start_guard()

    assert guard.starts == starts


def test_a_guardian_that_cannot_start_is_logged_and_the_daemon_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = FakeGuard(GuardError(2, "cannot start the guardian: No such file"))
    monkeypatch.setattr(daemon_module, "process_guard", lambda: guard)

    with capture_logs() as events:
        daemon_on(tmp_path, WITH_PYTHON)._start_guard()  # does not raise

    assert events == [
        {
            "event": "guardian_start_failed",
            "error": "cannot start the guardian: No such file",
            "log_level": "error",
        }
    ]


async def test_what_this_instance_marked_in_flight_but_does_not_run_goes_back(
    tmp_path: Path,
) -> None:
    store, clock = InMemoryStore(), FakeClock()
    daemon = daemon_on(tmp_path, NOOP_ONLY, store, clock)
    for n in range(4):
        await store.check_and_reserve(NewDispatch(task="n", params={"n": n}), clock.now())
    ours = await store.claim_many(daemon.instance_id, clock.now(), (), 3)
    theirs = await store.claim_next("another-instance", clock.now(), ())
    assert theirs is not None
    running, abandoned = ours[0], ours[1:]
    daemon.state.inflight[running.id] = InFlight(running.id)
    store.finish_dispatch(ours[2].id, DispatchStatus.SUCCEEDED, clock.now())

    with capture_logs() as logged:
        requeued = await daemon.self_check()

    assert requeued == [abandoned[0].id]  # the finished one stays finished
    statuses = {d.id: d.status for d in store.dispatches.values()}
    assert statuses[abandoned[0].id] is DispatchStatus.QUEUED
    assert statuses[running.id] is DispatchStatus.PLANNING  # in flight: left alone
    assert statuses[theirs.id] is DispatchStatus.PLANNING  # another instance's: left alone
    assert [(e["event"], e["dispatch_id"], e["reason"]) for e in logged] == [
        ("dispatch_requeued", abandoned[0].id, "self_check")
    ]


class ReadyNotifier(Notifier):
    """Tells when the daemon said it is ready (it tunes the collector right after)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()

    def ready(self, status: str | None = None) -> None:
        asyncio.get_running_loop().call_soon(self.started.set)  # once the start has ended


@pytest.mark.parametrize("owns_process", [True, False])
async def test_once_started_the_daemon_tunes_the_collector_and_the_gil(
    tmp_path: Path, owns_process: bool
) -> None:
    """Every full collection scanned again all that the start built (modules, the
    configuration, connections), about 30 ms each, every second or so under load; and
    the youngest generation was collected every few dispatches for next to nothing. The
    store's thread waited 5 ms for the GIL while the loop was busy. Only for `dispatcher
    run`: a daemon inside another program leaves its collector and its GIL be."""
    threshold = gc.get_threshold()
    interval = sys.getswitchinterval()
    gc.unfreeze()
    try:
        config = tmp_path / "dispatcher.toml"
        config.write_text(NOOP_ONLY)
        settings = load_settings(config, {})
        notifier = ReadyNotifier()
        daemon = Daemon(settings, InMemoryStore(), notifier=notifier, owns_process=owns_process)
        running = asyncio.create_task(daemon.run())
        await asyncio.wait_for(notifier.started.wait(), 10)
        if owns_process:
            assert gc.get_freeze_count() > 1000  # the modules' objects, at least
            assert gc.get_threshold() == (daemon_module.GC_YOUNG_THRESHOLD, *threshold[1:])
            assert sys.getswitchinterval() == pytest.approx(daemon_module.SWITCH_INTERVAL)
        else:
            assert gc.get_freeze_count() == 0
            assert gc.get_threshold() == threshold
            assert sys.getswitchinterval() == interval
        daemon.stop()
        await asyncio.wait_for(running, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)


async def test_dispatcher_run_owns_its_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_daemon` (what `dispatcher run` runs) is the one that tunes the collector."""
    made: list[bool] = []

    class Recorded(Daemon):
        async def run(self) -> None:
            made.append(self._owns_process)

    async def opened(*_: object, **__: object) -> InMemoryStore:
        return InMemoryStore()

    monkeypatch.setattr(daemon_module, "Daemon", Recorded)
    monkeypatch.setattr(store_package, "open_store", opened)
    monkeypatch.setattr(store_package, "daemon_lock", lambda _settings: nullcontext(None))
    config = tmp_path / "dispatcher.toml"
    config.write_text(NOOP_ONLY)

    await daemon_module.run_daemon(load_settings(config, {}), notifier=Notifier())

    assert made == [True]
