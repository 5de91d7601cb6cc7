"""The self-check of a live daemon: what it marked in flight but does not run goes back.

A write that was lost before it could be retried (or a claim whose start failed) leaves
a dispatch `planning`/`running` under this instance with nothing running it. Recovery
at start repairs that after a restart; the self-check repairs it without one.
"""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from dispatcher.config import load_settings
from dispatcher.daemon import Daemon
from dispatcher.models import DispatchStatus, NewDispatch
from dispatcher.pipeline import InFlight
from dispatcher.testing import FakeClock, InMemoryStore

CONFIG = """
[database]
path = "d.db"
[runners.noop]
type = "noop"
[tasks.n]
steps = [{ name = "a", runner = "noop" }]
"""


def make_daemon(tmp_path: Path, store: InMemoryStore, clock: FakeClock) -> Daemon:
    config = tmp_path / "dispatcher.toml"
    config.write_text(CONFIG)
    return Daemon(load_settings(config, {}), store, clock=clock)


async def test_what_this_instance_marked_in_flight_but_does_not_run_goes_back(
    tmp_path: Path,
) -> None:
    store, clock = InMemoryStore(), FakeClock()
    daemon = make_daemon(tmp_path, store, clock)
    for n in range(4):
        await store.check_and_reserve(NewDispatch(task="n", params={"n": n}), clock.now())
    ours = await store.claim_many(daemon.instance_id, clock.now(), (), 3)
    theirs = await store.claim_next("another-instance", clock.now(), ())
    assert theirs is not None
    running, abandoned = ours[0], ours[1:]
    daemon.state.inflight[running.id] = InFlight(running.id)
    await store.finish_dispatch(ours[2].id, DispatchStatus.SUCCEEDED, clock.now())

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
