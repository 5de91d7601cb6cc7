"""What `show`, `status`, the status page and the live line say about parallel branches
and results (from the database, and from the daemon's memory)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from dispatcher import cli, service, statuspage, watch
from dispatcher.config import Settings, load_settings
from dispatcher.models import AttemptStatus, Instance, NewDispatch
from dispatcher.planners import steps_plan
from dispatcher.testing import FakeClock, InMemoryStore

STEPS = """[
  { name = "build", runner = "RUNNER" },
  { name = "test", runner = "RUNNER", needs = ["build"] },
  { name = "lint", runner = "RUNNER", needs = ["build"] },
  { name = "deploy", runner = "RUNNER", needs = ["test", "lint"], args = ["{steps.build.result}"] },
]"""
CONFIG = f"""
[runners.shell]
type = "exec"
concurrency = 1

[runners.free]
type = "exec"

[tasks.ci]
steps = {STEPS.replace("RUNNER", "shell")}

[tasks.ci_free]
steps = {STEPS.replace("RUNNER", "free")}
"""
LIVE = "live"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    path = tmp_path / "dispatcher.toml"
    path.write_text(CONFIG)
    return load_settings(path, {})


async def built(
    settings: Settings, store: InMemoryStore, clock: FakeClock, task: str = "ci"
) -> int:
    """A dispatch in flight on a live daemon, its build done (result '/a.tar')."""
    now = clock.now()
    await store.register_instance(Instance(LIVE, "host", 1, "0", now, now, None))
    dispatch_id = (await store.check_and_reserve(NewDispatch(task, {}), now)).id
    await store.claim_many(LIVE, now, (), 1)
    await store.save_plan(dispatch_id, steps_plan(settings.tasks[task], {}), now)
    await store.open_slot("global", f"dispatch:{dispatch_id}", LIVE, now)
    build = await store.start_attempt(dispatch_id, 0, "build", "shell", 1, LIVE, now)
    store.finish_attempt(build, AttemptStatus.SUCCEEDED, now, result='"/a.tar"')
    await store.advance(dispatch_id, 1, now)
    return dispatch_id


async def test_show_and_status_list_the_branches_running_now(settings: Settings) -> None:
    store, clock = InMemoryStore(), FakeClock()
    dispatch_id = await built(settings, store, clock, "ci_free")
    for index, step in [(1, "test"), (2, "lint")]:
        await store.start_attempt(dispatch_id, index, step, "free", 1, LIVE, clock.now())

    shown = (await service.show(store, dispatch_id, settings, clock)).to_json()
    (in_flight,) = (await service.status(settings, store, clock)).in_flight

    branches = [{"step": s, "attempt": 1, "waiting_for": None} for s in ("test", "lint")]
    assert shown["running"] == branches
    assert in_flight.to_json()["running"] == branches
    assert shown["attempts"][0]["result"] == "/a.tar"
    assert shown["plan"][3]["needs"] == ["test", "lint"]
    assert cli._in_flight_text(in_flight).split()[2:5] == ["steps", "test", "#1,"]
    assert "running steps test (attempt 1), lint (attempt 1)" in watch.describe(shown, 3)


async def test_a_graph_waits_for_a_runner_only_when_none_of_its_ready_steps_runs(
    settings: Settings,
) -> None:
    store, clock = InMemoryStore(), FakeClock()
    dispatch_id = await built(settings, store, clock)
    assert (await service.show(store, dispatch_id, settings, clock)).waiting_for == "runner:shell"

    await store.open_slot("runner:shell", f"dispatch:{dispatch_id}/lint#1", LIVE, clock.now())

    assert (await service.show(store, dispatch_id, settings, clock)).waiting_for is None


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_status_page_shows_each_branch_and_what_it_waits_for() -> None:
    branches = (
        statuspage.BranchRow("test", 1, 1, None),
        statuspage.BranchRow("<lint>", 2, None, "runner:shell"),
    )
    row = statuspage.RunningRow(7, "ci", "running", "test", NOW, steps=4, branches=branches)
    view = statuspage.StatusView(
        instance_id="i",
        version="1",
        started_at=NOW,
        now=NOW,
        stopping=False,
        gates=[],
        queue={},
        running=[row],
        failures=[],
    )
    page = statuspage.render(view)
    assert '<div class="branch" data-step="test">test #1</div>' in page
    assert 'data-step="&lt;lint&gt;">&lt;lint&gt; <span class="waiting">waiting</span> for ' in page


async def test_the_dispatch_page_shows_needs_running_steps_and_results(
    settings: Settings,
) -> None:
    store, clock = InMemoryStore(), FakeClock()
    dispatch_id = await built(settings, store, clock)
    await store.start_attempt(dispatch_id, 2, "lint", "shell", 1, LIVE, clock.now())
    shown = await service.show(store, dispatch_id, settings, clock)
    page = statuspage.render_dispatch(shown.to_json())
    assert '<td>▶</td><td class="num">3</td><td>lint</td><td>build</td>' in page
    assert '<td></td><td class="num">2</td><td>test</td><td>build</td>' in page
    assert '<div class="result">result <code>&quot;/a.tar&quot;</code></div>' in page
