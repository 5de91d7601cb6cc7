"""Schedules, delayed dispatches and retry, on the real daemon (issue 18).

Every figure comes from what the steps record themselves: each step appends its
dispatch's key (`schedule:NAME:<fire time>` for a fire) and the time it ran.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import postgres

from .conftest import Daemon, wait_until

pytestmark = pytest.mark.slow

EVERY = 2
ON_TIME = 1.0
"""Seconds a fire's step may start after its fire time on a loaded machine (it takes
some milliseconds on an idle one)."""


def stamp_step(log: Path) -> str:
    """A step that records its dispatch's key and the time it runs, in one write."""
    script = f'echo "$DISPATCHER_KEY $(date +%s.%N)" >> {log}'
    return f'{{ name = "stamp", runner = "sh", args = ["sh", "-c", {json.dumps(script)}] }}'


def config(database: str, log: Path, *, poll: str = "500ms") -> str:
    return f"""
[database]
{database}

[daemon]
poll_interval = "{poll}"
shutdown_grace = "5s"
kill_grace = "1s"
heartbeat_interval = "500ms"
instance_ttl = "3s"

[runners.sh]
type = "exec"

[tasks.stamp]
steps = [{stamp_step(log)}]

[schedules.tick]
task = "stamp"
every = "{EVERY}s"
overlap = "allow"
catch_up = "all"
"""


def fires(log: Path) -> list[tuple[float, float]]:
    """(fire time, time its step ran) of each schedule step recorded, in order."""
    found = []
    for line in log.read_text().splitlines() if log.exists() else []:
        key, ran = line.split()
        if key.startswith("schedule:tick:"):
            stamp = key.removeprefix("schedule:tick:")
            found.append((datetime.fromisoformat(stamp).timestamp(), float(ran)))
    return found


def ran_after(log: Path, moment: float) -> int:
    return sum(1 for fire, _ in fires(log) if fire > moment)


def sleep_to_mid_interval() -> None:
    """Sleep until half-way between two fires: the last fire's step has ended (a step
    cut short by a SIGKILL runs again after the restart: at least once, as any step)."""
    now = time.time()
    mid = (now // EVERY) * EVERY + EVERY / 2
    while mid < now + 0.1:
        mid += EVERY
    time.sleep(mid - now)


def assert_every_fire_once(log: Path, down: tuple[float, float] | None = None) -> None:
    """Consecutive fire times, each run exactly once; on time, but for those that fell
    due while no daemon ran (made up for at the restart)."""
    recorded = fires(log)
    times = [fire for fire, _ in recorded]
    assert len(times) == len(set(times)), f"a fire ran twice: {sorted(times)}"
    ordered = sorted(times)
    assert ordered == [ordered[0] + EVERY * n for n in range(len(ordered))], "a fire was lost"
    for fire, ran in recorded:
        missed = down is not None and down[0] < fire <= down[1]
        assert ran >= fire
        if not missed:
            assert ran - fire < ON_TIME, f"fire {fire} ran {ran - fire:.3f}s late"


def test_a_schedule_every_2s_fires_on_time_across_a_sigkill_and_restart(
    make_daemon: Any, tmp_path: Path
) -> None:
    log = tmp_path / "steps.log"
    daemon = make_daemon(config('path = "state/dispatcher.db"', log))
    daemon.start()
    wait_until(lambda: len(fires(log)) >= 1, timeout=15, interval=0.05)
    sleep_to_mid_interval()
    killed_at = time.time()
    daemon.kill()
    time.sleep(EVERY + 0.5)  # at least one fire falls due while it is down
    daemon.start()
    restarted_at = time.time()
    wait_until(lambda: ran_after(log, restarted_at) >= 1, timeout=15, interval=0.05)
    assert daemon.stop() == 0

    assert_every_fire_once(log, down=(killed_at, restarted_at))
    assert any(killed_at < fire <= restarted_at for fire, _ in fires(log))  # made up for
    listed = daemon.cli_json("list")
    assert {row["status"] for row in listed} == {"succeeded"}
    assert len(listed) == len(fires(log))
    schedules = daemon.cli_json("schedules")["schedules"]
    assert schedules[0]["last_status"] == "succeeded"
    assert schedules[0]["last_fire"] == max(row["key"] for row in listed).split(":", 2)[2]


@pytest.fixture
def pg_url() -> Iterator[str]:
    postgres.server_or_skip()
    url = postgres.create_database()
    try:
        yield url
    finally:
        postgres.drop_database(url)


def test_three_daemons_on_postgresql_fire_each_time_once_across_a_sigkill(
    make_daemon: Any, tmp_path: Path, pg_url: str
) -> None:
    log = tmp_path / "steps.log"
    text = config(f'url = "{pg_url}"', log)
    daemons: list[Daemon] = [make_daemon(text) for _ in range(3)]
    for daemon in daemons:
        daemon.start(wait=False)
    for daemon in daemons:
        daemon.wait_for_event("daemon_started")
    wait_until(lambda: len(fires(log)) >= 1, timeout=15, interval=0.05)
    sleep_to_mid_interval()
    daemons[0].kill()
    time.sleep(EVERY)  # the two others fire meanwhile
    daemons[0].start()
    restarted_at = time.time()
    wait_until(lambda: ran_after(log, restarted_at) >= 1, timeout=15, interval=0.05)
    sleep_to_mid_interval()
    for daemon in daemons:
        assert daemon.stop() == 0

    assert_every_fire_once(log)
    logged = [
        line
        for path in tmp_path.glob("daemon-*.log")  # the killed daemon's first log too
        for line in path.read_text().splitlines()
        if '"event": "schedule_fired"' in line
    ]
    assert len(logged) == len(fires(log))  # each fire made its dispatch on one daemon


def test_submit_in_runs_within_its_time_plus_50ms(make_daemon: Any, tmp_path: Path) -> None:
    log = tmp_path / "steps.log"
    # No schedule, and a poll interval far longer than the delay: only the wake-up at
    # the dispatch's time can start it in time.
    text = config('path = "state/dispatcher.db"', log, poll="30s")
    daemon = make_daemon(text.split("[schedules.tick]")[0])
    daemon.start()
    later = daemon.cli_json("submit", "stamp", "--in", "1h")
    listed = daemon.cli("list")
    assert f"{later['id']:>8}  due " in listed.stdout, listed.stdout  # waiting: its time shows
    answer = daemon.cli_json("submit", "stamp", "--in", "1s")
    due = datetime.fromisoformat(answer["not_before"]).timestamp()
    assert answer["created"] and answer["status"] == "queued"
    wait_until(lambda: log.exists() and log.read_text().strip(), timeout=10, interval=0.01)
    ran = float(log.read_text().split()[-1])
    assert due <= ran <= due + 0.050, f"ran {ran - due:+.3f}s after its time"
    assert daemon.stop() == 0


def test_a_sighup_adds_changes_and_removes_schedules_live(make_daemon: Any, tmp_path: Path) -> None:
    log = tmp_path / "steps.log"
    base = config('path = "state/dispatcher.db"', log).split("[schedules.tick]")[0]
    daemon = make_daemon(base)
    daemon.start()
    assert daemon.proc is not None

    def reload(text: str) -> None:
        marker = len([e for e in daemon.events() if e.get("event") == "config_reloaded"])
        daemon.config.write_text(text)
        daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]  # started above
        wait_until(
            lambda: (
                len([e for e in daemon.events() if e.get("event") == "config_reloaded"]) > marker
            ),
            timeout=10,
            interval=0.05,
        )

    every = '[schedules.tick]\ntask = "stamp"\nevery = "{}s"\noverlap = "allow"\n'
    reload(base + every.format(1))
    wait_until(lambda: len(fires(log)) >= 2, timeout=15, interval=0.05)
    reload(base + every.format(3))
    changed_at = time.time()
    wait_until(lambda: ran_after(log, changed_at) >= 1, timeout=15, interval=0.05)
    reload(base)
    removed_at = time.time()
    time.sleep(3.5)
    assert ran_after(log, removed_at + 0.5) == 0  # removed: no fire after the reload
    assert daemon.stop() == 0

    times = [int(fire) for fire, _ in fires(log)]
    assert len(times) == len(set(times))
    assert all(t % 3 == 0 for t in times if t > changed_at + 0.5)  # every 3s once changed
    reloads = [e for e in daemon.events() if e.get("event") == "schedules_reloaded"]
    assert [(e["added"], e["changed"], e["removed"]) for e in reloads] == [
        (["tick"], [], []),
        ([], ["tick"], []),
        ([], [], ["tick"]),
    ]


def three_steps(tmp_path: Path) -> str:
    steps_log, ok = tmp_path / "three.log", tmp_path / "ok"
    step = '{{ name = "{0}", runner = "sh", args = ["sh", "-c", "echo {0} >> {1}{2}"] }}'
    two = f"; test -e {ok}"
    return f"""
[database]
path = "state/dispatcher.db"

[runners.sh]
type = "exec"

[tasks.three]
steps = [
  {step.format("one", steps_log, "")},
  {step.format("two", steps_log, two)},
  {step.format("three", steps_log, "")},
]
"""


def test_retry_of_a_dispatch_that_failed_at_step_2_runs_steps_2_and_3_only(
    make_daemon: Any, tmp_path: Path
) -> None:
    daemon = make_daemon(three_steps(tmp_path))
    daemon.start()
    failed = daemon.cli("submit", "three", "--wait")
    assert failed.returncode == 1, failed.stderr
    dispatch_id = int(failed.stdout.split()[0])
    dead = daemon.cli("list", "--status", "failed")
    assert "step 'two' failed after 1 attempt: exited with status 1" in dead.stdout
    assert "dispatcher retry ID" in dead.stderr

    (tmp_path / "ok").touch()
    retried = daemon.cli("retry", str(dispatch_id))
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"{dispatch_id} queued again from step two (retry 1)"
    daemon.wait_status(dispatch_id, "succeeded", timeout=20)  # the CLI shows it below
    assert daemon.stop() == 0

    # What the steps did: one ran once, two failed then ran again, three ran once.
    assert (tmp_path / "three.log").read_text().split() == ["one", "two", "two", "three"]
    shown = daemon.cli_json("show", str(dispatch_id))
    assert shown["series"] == 1
    assert [(a["step"], a["attempt"], a["status"], a["series"]) for a in shown["attempts"]] == [
        ("one", 1, "succeeded", 0),
        ("two", 1, "failed", 0),
        ("two", 2, "succeeded", 1),
        ("three", 1, "succeeded", 1),
    ]
    again = daemon.cli("retry", str(dispatch_id))
    assert again.returncode == 65
    assert again.stderr.strip() == (
        f"dispatcher: error: dispatch {dispatch_id} is succeeded: only a failed or "
        "cancelled dispatch can be retried"
    )
