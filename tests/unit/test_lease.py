"""A daemon's lease on a shared store: the self-fence before the TTL, the loss, the rejoin.

The store side (fenced writes) is in tests/contract; the real thing (SIGSTOP, a cut
connection) in tests/e2e/test_leases.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatcher.config import load_settings
from dispatcher.daemon import Daemon, crash_summary
from dispatcher.errors import LeaseLost
from dispatcher.lease import Lease, LeaseState, fence_after
from dispatcher.pipeline import CancelReason, InFlight
from dispatcher.runners.orphan_guard import process_guard
from dispatcher.testing import FakeClock, InMemoryStore

CONFIG = """
[database]
path = "d.db"
[daemon]
instance_ttl = "3s"
heartbeat_interval = "500ms"
[runners.noop]
type = "noop"
[tasks.n]
steps = [{ name = "a", runner = "noop" }]
"""


class SharedMemoryStore(InMemoryStore):
    shared = True


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_self_fence_comes_a_margin_before_the_ttl() -> None:
    assert fence_after(3) == 2.0  # at least a second before
    assert fence_after(30) == 24.0  # a fifth of the TTL before
    for ttl in (2, 3, 10, 30, 300):
        assert 0 < fence_after(ttl) <= ttl - 1


def test_a_lease_not_renewed_is_fenced_then_renewed_or_lost() -> None:
    clock = Monotonic()
    lease = Lease(3, now=clock)
    clock.now += 1.9
    assert not lease.due_for_fence() and lease.may_claim
    clock.now += 0.2
    assert lease.due_for_fence()
    lease.fence()
    assert not lease.may_claim and not lease.due_for_fence()
    assert lease.renewed(sent_at=clock.now)  # a heartbeat went through: fence over
    assert lease.state is LeaseState.HELD and lease.may_claim
    assert lease.lose() and not lease.lose()  # news once
    assert not lease.renewed(sent_at=clock.now)  # a lost lease stays lost
    assert lease.state is LeaseState.LOST


async def test_a_reaped_daemon_ends_its_work_and_rejoins_as_a_new_instance(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = tmp_path / "dispatcher.toml"
    config.write_text(CONFIG)
    store, clock = SharedMemoryStore(), FakeClock()
    daemon = Daemon(load_settings(config, {}), store, clock=clock)
    store.on_lease_lost = daemon._lease_lost
    # Registering on a shared store arms this process's guardian (when an earlier test
    # started one) with a lease deadline: lift it afterwards, or the guardian later ends
    # whatever another test's subprocess runs with this process's token.
    request.addfinalizer(lambda: process_guard().lease(0))
    await daemon._register(clock.now())
    old = daemon.instance_id
    flight = InFlight(7)
    daemon.state.inflight[7] = flight
    await store.stop_instance(old, clock.now())  # what another daemon's reaper does

    with capture_logs() as logged, pytest.raises(LeaseLost):
        await store.heartbeat(old, clock.now())

    assert flight.reason is CancelReason.LEASE and flight.scope.cancel_called
    assert daemon.lease.state is LeaseState.LOST and not daemon.lease.may_claim
    (lost,) = [e for e in logged if e["event"] == "lease_lost"]
    assert lost["in_flight"] == 1

    del daemon.state.inflight[7]  # the step ended
    with capture_logs() as logged:
        await daemon._rejoin()

    assert daemon.instance_id != old and store.lease == daemon.instance_id
    assert daemon.gate.instance_id == daemon.pipeline.instance_id == daemon.instance_id
    assert daemon.claims.instance_id == daemon.instance_id  # it claims as the new one
    assert daemon.lease.may_claim
    assert store.instances[daemon.instance_id].stopped_at is None
    assert store.instances[old].stopped_at is not None  # never revived
    assert [e["event"] for e in logged] == ["lease_rejoined"]


def test_a_crash_names_every_error_of_a_task_group() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as first:
            raise ExceptionGroup(
                "unhandled errors in a TaskGroup",
                [first, ExceptionGroup("nested", [ValueError("deep")])],
            ) from None
    except ExceptionGroup as group:
        assert crash_summary(group) == ["KeyError: 'inner'", "ValueError: deep"]


async def test_a_daemon_on_a_shared_store_lifts_its_guardians_deadline_when_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Armed at each renewal, the guardian's deadline must not outlive the daemon: in a
    process that goes on without it (an embedding host, a test run), the deadline
    would pass and the guardian would end whatever later runs with this token."""
    deadlines: list[int] = []
    monkeypatch.setattr(process_guard(), "lease", deadlines.append)
    config = tmp_path / "dispatcher.toml"
    config.write_text(CONFIG)
    daemon = Daemon(load_settings(config, {}), SharedMemoryStore(), clock=FakeClock())
    running = asyncio.create_task(daemon.run())
    for _ in range(500):
        if deadlines:
            break
        await asyncio.sleep(0.01)
    assert deadlines and deadlines[0] > 0  # armed by the first renewal
    daemon.stop()
    await asyncio.wait_for(running, 10)
    assert deadlines[-1] == 0  # and lifted at the stop
