"""Honest status from the database alone: in flight never more than the gate allows,
and what waits for a gate says which."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher import service
from dispatcher.config import Settings, load_settings
from dispatcher.models import AttemptStatus, DispatchStatus, Instance, NewDispatch, Step
from dispatcher.testing import FakeClock, InMemoryStore
from dispatcher.views import json_list

CONFIG = """
[gate]
global = 2

[runners.shell]
type = "exec"
concurrency = 1

[tasks.t]
steps = [{ name = "s", runner = "shell" }]

[tasks.lane]
concurrency = 1
concurrency_key = "{lane}"
steps = [{ name = "s", runner = "shell" }]
"""

LIVE = "live-daemon"
DEAD = "dead-daemon"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    path = tmp_path / "dispatcher.toml"
    path.write_text(CONFIG)
    return load_settings(path, {})


async def register(store: InMemoryStore, clock: FakeClock, instance_id: str) -> None:
    now = clock.now()
    await store.register_instance(Instance(instance_id, "host", 1, "0", now, now, None))


async def running(store: InMemoryStore, clock: FakeClock, task: str, instance: str) -> int:
    """A dispatch claimed by `instance` and at its first step, holding no place yet."""
    gate_key = "task:lane:a" if task == "lane" else None
    params = {"lane": "a"} if task == "lane" else {}
    new = NewDispatch(task, params, gate_key=gate_key)
    reservation = await store.check_and_reserve(new, clock.now())
    (claimed,) = await store.claim_many(instance, clock.now(), (), 1)
    assert claimed.id == reservation.id
    await store.save_plan(claimed.id, [Step("s", "shell")], clock.now())
    return claimed.id


async def test_in_flight_comes_from_the_gate_rows_never_more_than_the_cap(
    settings: Settings,
) -> None:
    store, clock = InMemoryStore(), FakeClock()
    await register(store, clock, LIVE)
    first = await running(store, clock, "t", LIVE)
    second = await running(store, clock, "t", LIVE)
    for dispatch_id in (first, second):
        await store.open_slot("global", f"dispatch:{dispatch_id}", LIVE, clock.now())
    await store.open_slot("runner:shell", f"dispatch:{first}/s#1", LIVE, clock.now())
    # Claimed a moment ago, its `global` row not written yet: the daemon's claim commits
    # before the row of its place. Counting `running` rows would show 3 with global 2/2.
    await running(store, clock, "t", LIVE)

    data = (await service.status(settings, store, clock)).to_json()

    assert [item["id"] for item in data["in_flight"]] == [first, second]
    assert data["in_flight_count"] == 2
    global_gate = data["gates"][0]
    assert (global_gate["name"], global_gate["held"], global_gate["capacity"]) == ("global", 2, 2)
    waiting = {item["id"]: item["waiting_for"] for item in data["in_flight"]}
    assert waiting == {first: None, second: "runner:shell"}


async def test_places_of_a_dead_daemon_are_not_in_flight(settings: Settings) -> None:
    store, clock = InMemoryStore(), FakeClock()
    await register(store, clock, DEAD)
    orphan = await running(store, clock, "t", DEAD)
    await store.open_slot("global", f"dispatch:{orphan}", DEAD, clock.now())
    clock.advance(settings.daemon.instance_ttl + 1)  # its heartbeat is now too old

    data = (await service.status(settings, store, clock)).to_json()

    assert not data["live"]
    assert data["in_flight"] == [] and data["in_flight_count"] == 0
    assert data["stale_instances"] == [DEAD]


async def test_a_queued_dispatch_whose_task_gate_is_full_waits_for_it(
    settings: Settings,
) -> None:
    store, clock = InMemoryStore(), FakeClock()
    await register(store, clock, LIVE)
    holder = await running(store, clock, "lane", LIVE)
    await store.open_slot("task:lane:a", f"dispatch:{holder}", LIVE, clock.now())
    queued = await store.check_and_reserve(
        NewDispatch("lane", {"lane": "a"}, gate_key="task:lane:a"), clock.now()
    )

    data = (await service.status(settings, store, clock)).to_json()
    assert [(q["id"], q["waiting_for"]) for q in data["queued"]] == [(queued.id, "task:lane:a")]
    shown = (await service.show(store, queued.id, settings, clock)).to_json()
    assert shown["status"] == "queued" and shown["waiting_for"] == "task:lane:a"
    listed = json_list(await service.list_dispatches(store, None, 10, settings, clock))
    assert {row["id"]: row["waiting_for"] for row in listed}[queued.id] == "task:lane:a"


async def test_a_failure_shows_the_tail_of_its_output(settings: Settings) -> None:
    store, clock = InMemoryStore(), FakeClock()
    failed = await running(store, clock, "t", LIVE)
    attempt = await store.start_attempt(failed, 0, "s", "shell", 1, LIVE, clock.now())
    output = "".join(f"line {n}\n" for n in range(20)) + "disk full on /data\n"
    store.finish_attempt(attempt, AttemptStatus.FAILED, clock.now(), exit_code=1, output=output)
    store.finish_dispatch(failed, DispatchStatus.FAILED, clock.now(), "exited with status 1")

    (failure,) = (await service.status(settings, store, clock)).to_json()["recent_failures"]
    assert failure["output_tail"].splitlines() == [
        "line 16",
        "line 17",
        "line 18",
        "line 19",
        "disk full on /data",
    ]
