"""The real daemon process, driven through the CLI: caps, crashes, drain, errors."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from .conftest import FINAL, STEP, peak_concurrency, read_records, wait_until

pytestmark = pytest.mark.slow


def config(
    tmp_path: Path,
    *,
    global_: int,
    runner_cap: int | None = None,
    extra: str = "",
    grace: str = "10s",
    poll: str = "200ms",
    heartbeat: str = "500ms",
) -> str:
    cap = f"concurrency = {runner_cap}" if runner_cap else ""
    ttl = "3s" if heartbeat == "500ms" else "10m"
    log = tmp_path / "steps.log"
    step = f'"{sys.executable}", "-S", "{STEP}", "{log}"'
    return f"""
[database]
path = "state/dispatcher.db"

[daemon]
poll_interval = "{poll}"
shutdown_grace = "{grace}"
kill_grace = "1s"
heartbeat_interval = "{heartbeat}"
instance_ttl = "{ttl}"

[gate]
global = {global_}

[runners.py]
type = "exec"
{cap}

[runners.noop]
type = "noop"

[tasks.one]
steps = [{{ name = "s1", runner = "py", args = [{step}, "{{n}}/s1", "{{secs}}"] }}]

[tasks.three]
steps = [
  {{ name = "s1", runner = "py", args = [{step}, "{{n}}/s1", "{{secs}}"] }},
  {{ name = "s2", runner = "py", args = [{step}, "{{n}}/s2", "{{secs}}"] }},
  {{ name = "s3", runner = "py", args = [{step}, "{{n}}/s3", "{{secs}}"] }},
]
{extra}
"""


def batch(task: str, count: int, secs: float, prefix: str = "") -> str:
    lines = [
        json.dumps({"task": task, "params": {"n": f"{prefix}{n}", "secs": str(secs)}})
        for n in range(count)
    ]
    return "\n".join(lines) + "\n"


def all_final(daemon: Any, count: int) -> bool:
    statuses = daemon.statuses()
    return len(statuses) == count and all(s in FINAL for s in statuses.values())


def attempts_of_all(daemon: Any) -> list[dict[str, Any]]:
    """Every attempt row with its dispatch's id and `n`, read from the database (a CLI
    process per dispatch cost a fifth of a second of CPU each). The CLI's `show` of the
    first and the last dispatch must report the same attempts."""
    rows = daemon.query(
        "SELECT a.dispatch_id, a.step, a.runner, a.status, d.params FROM attempts a "
        "JOIN dispatches d ON d.id = a.dispatch_id ORDER BY a.dispatch_id, a.id"
    )
    attempts = [
        {"id": id_, "step": step, "runner": runner, "status": status, "n": json.loads(params)["n"]}
        for id_, step, runner, status, params in rows
    ]
    ids = sorted({attempt["id"] for attempt in attempts})
    for dispatch_id in sorted({ids[0], ids[-1]}):
        shown = daemon.cli_json("show", str(dispatch_id))["attempts"]
        assert [(a["step"], a["runner"], a["status"]) for a in shown] == [
            (a["step"], a["runner"], a["status"]) for a in attempts if a["id"] == dispatch_id
        ]
    return attempts


@pytest.mark.parametrize("cap", [2, 3])
def test_exactly_global_n_steps_run_at_once(tmp_path: Path, make_daemon: Any, cap: int) -> None:
    """The old defect halved the cap (reservation and gate both counted a dispatch).

    Here, with more dispatches waiting than the cap, the steps' own timestamps must
    show exactly `cap` running at once: not cap/2, not cap+1.
    """
    daemon = make_daemon(config(tmp_path, global_=cap))
    submitted = daemon.cli("submit", "--batch", "-", stdin=batch("one", cap * 4, 0.6))
    assert submitted.returncode == 0, submitted.stderr
    daemon.start()
    wait_until(lambda: all_final(daemon, cap * 4), timeout=60)
    assert daemon.stop() == 0

    records = read_records(tmp_path / "steps.log")
    assert peak_concurrency(records) == cap
    starts = [r for r in records if r.kind == "start"]
    assert len(starts) == cap * 4
    # attempts holds exactly one row per runner execution, nothing else
    attempts = attempts_of_all(daemon)
    assert len(attempts) == len(starts)
    assert {a["runner"] for a in attempts} == {"py"}
    gates = daemon.cli_json("gates")
    assert gates["rows"] == {"held": 0, "released": cap * 4, "purgeable": 0}
    assert all(gate["held"] == 0 for gate in gates["gates"])


def test_runner_cap_is_held_per_step(tmp_path: Path, make_daemon: Any) -> None:
    daemon = make_daemon(config(tmp_path, global_=4, runner_cap=2))
    daemon.cli("submit", "--batch", "-", stdin=batch("one", 8, 0.5))
    daemon.start()
    wait_until(lambda: all_final(daemon, 8), timeout=60)
    assert daemon.stop() == 0
    assert peak_concurrency(read_records(tmp_path / "steps.log")) == 2
    gates = daemon.cli_json("gates")
    # 8 global slots + 8 runner slots, all released
    assert gates["rows"] == {"held": 0, "released": 16, "purgeable": 0}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_a_cli_submission_wakes_the_daemon_instead_of_waiting_for_its_poll(
    tmp_path: Path, make_daemon: Any
) -> None:
    daemon = make_daemon(
        """
[database]
path = "state/dispatcher.db"
[daemon]
poll_interval = "60s"
[runners.noop]
type = "noop"
[tasks.n]
steps = [{ name = "a", runner = "noop" }]
"""
    )
    daemon.start()
    daemon.wait_for_event("daemon_started")

    submitted = daemon.cli("submit", "n", "--wait", "--json", timeout=20)

    assert submitted.returncode == 0, submitted.stderr
    (shown,) = daemon.cli_json("list")
    took = datetime.fromisoformat(shown["finished_at"]) - datetime.fromisoformat(
        shown["created_at"]
    )
    assert shown["status"] == "succeeded" and took < timedelta(seconds=10)  # not 60 s
    assert not [e for e in daemon.events() if e["event"] == "listen_failed"]


def test_what_a_python_step_leaves_running_dies_with_the_daemon(
    tmp_path: Path, make_daemon: Any
) -> None:
    """The guard starts with the daemon, so a python step's own children carry its
    token too (not only once an exec step has run): a SIGKILL leaves no orphan."""
    pidfile = tmp_path / "left.pid"
    call = "tests.e2e.pysteps:leave_a_process"
    daemon = make_daemon(
        f"""
[database]
path = "state/dispatcher.db"
[runners.py]
type = "python"
[tasks.leave]
steps = [{{ name = "a", runner = "py", call = "{call}", kwargs = {{ pidfile = "{pidfile}" }} }}]
"""
    )
    daemon.start()
    assert daemon.wait_for_event("daemon_started")["guardian_pid"] is not None
    submitted = daemon.cli("submit", "leave", "--wait")
    assert submitted.returncode == 0, submitted.stderr
    pid = int(pidfile.read_text())
    assert _alive(pid)

    daemon.kill()

    wait_until(lambda: not _alive(pid), timeout=5)


ON_PG = pytest.mark.skipif(
    os.environ.get("DISPATCHER_E2E_PG") == "1",
    reason="SQLite semantics: on PostgreSQL there is no instance lock, and a restarted "
    "daemon leaves its predecessor to the lease reaper (tests/e2e/test_postgres_scaling.py)",
)


@ON_PG
def test_sigkill_then_restart_loses_nothing(tmp_path: Path, make_daemon: Any) -> None:
    daemon = make_daemon(config(tmp_path, global_=3))
    count = 9
    daemon.cli("submit", "--batch", "-", stdin=batch("three", count, 0.4))
    daemon.start()
    log = tmp_path / "steps.log"
    wait_until(lambda: sum(r.kind == "end" for r in read_records(log)) >= 5, timeout=30)
    # Kill while steps are mid-flight: a start with no end yet, and far from its end
    # (steps take 0.4 s), so that it cannot end between this check and the kill.
    wait_until(
        lambda: any(
            r.kind == "start"
            and 0.02 < time.time() - r.at < 0.25
            and not any(
                e.kind == "end" and e.label == r.label and e.pid == r.pid for e in read_records(log)
            )
            for r in read_records(log)
        ),
        timeout=10,
        interval=0.01,
    )
    daemon.kill()
    killed_at = time.time()
    running = [
        r
        for r in read_records(log)
        if r.kind == "start"
        and not any(e.kind == "end" and e.pid == r.pid for e in read_records(log))
    ]
    assert running, "the kill should have caught steps mid-flight"
    # Children die with the daemon (its guardian kills them): no orphan runs beside the next one.
    wait_until(lambda: not any(_alive(r.pid) for r in running), timeout=5)

    daemon.start()
    recovered = daemon.wait_for_event("daemon_recovered")
    assert recovered["attempts_interrupted"] >= 1
    assert recovered["slots_released"] >= 1
    wait_until(lambda: all_final(daemon, count), timeout=90)
    assert daemon.stop() == 0

    rows = daemon.cli_json("list", "--limit", "100")
    assert {row["status"] for row in rows} == {"succeeded"}
    records = read_records(log)
    attempts = attempts_of_all(daemon)
    # One attempt row per execution, counted from the steps' own records. The kill
    # may land between an attempt's row and its process's first write: such an
    # attempt is recorded as interrupted and has no start record.
    starts = sum(r.kind == "start" for r in records)
    interrupted = sum(a["status"] == "interrupted" for a in attempts)
    assert starts <= len(attempts) <= starts + interrupted
    assert sum(a["status"] == "succeeded" for a in attempts) == count * 3
    by_step: dict[tuple[str, str], list[str]] = {}
    for attempt in attempts:
        by_step.setdefault((attempt["n"], attempt["step"]), []).append(attempt["status"])
    for statuses in by_step.values():
        # a step that succeeded never ran again: success is its last and only success
        assert statuses.count("succeeded") == 1 and statuses[-1] == "succeeded"
    assert any("interrupted" in statuses for statuses in by_step.values())
    assert peak_concurrency(records, killed_at) == 3
    assert daemon.cli_json("gates")["rows"]["held"] == 0


def test_sigterm_drains_then_interrupts_and_requeues(tmp_path: Path, make_daemon: Any) -> None:
    daemon = make_daemon(config(tmp_path, global_=2, grace="500ms"))
    daemon.cli("submit", "one", "--param", "n=long", "--param", "secs=30")
    daemon.start()
    log = tmp_path / "steps.log"
    wait_until(lambda: any(r.kind == "start" for r in read_records(log)), timeout=20)
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10  # grace 0.5 s + kill grace 1 s, not 30 s
    shown = daemon.cli_json("show", "1")
    assert shown["status"] == "queued"
    assert [a["status"] for a in shown["attempts"]] == ["interrupted"]
    assert daemon.cli_json("gates")["rows"]["held"] == 0
    pid = read_records(log)[0].pid
    assert not _alive(pid)


def test_cancel_stops_a_running_step(tmp_path: Path, make_daemon: Any) -> None:
    daemon = make_daemon(config(tmp_path, global_=2))
    daemon.start()
    daemon.cli("submit", "one", "--param", "n=c", "--param", "secs=30")
    log = tmp_path / "steps.log"
    wait_until(lambda: any(r.kind == "start" for r in read_records(log)), timeout=20)
    result = daemon.cli("cancel", "1")
    assert result.returncode == 0 and "cancel requested" in result.stdout
    daemon.wait_status(1, "cancelled", timeout=10)
    assert [a["status"] for a in daemon.cli_json("show", "1")["attempts"]] == ["cancelled"]
    assert not _alive(read_records(log)[0].pid)
    assert daemon.stop() == 0


def test_a_cli_cancel_wakes_the_daemon_instead_of_waiting_for_its_poll(
    tmp_path: Path, make_daemon: Any
) -> None:
    # Long heartbeats too: on PostgreSQL each one wakes the daemons (the lease reaper's
    # statement fires the gates trigger), which would check for cancels as well.
    daemon = make_daemon(config(tmp_path, global_=2, poll="60s", heartbeat="60s"))
    daemon.start()
    daemon.cli("submit", "one", "--param", "n=c", "--param", "secs=30")
    log = tmp_path / "steps.log"
    wait_until(lambda: any(r.kind == "start" for r in read_records(log)), timeout=10)
    asked = time.monotonic()

    assert daemon.cli("cancel", "1").returncode == 0

    daemon.wait_status(1, "cancelled", timeout=20)
    assert time.monotonic() - asked < 10  # not the 60 s poll
    assert not _alive(read_records(log)[0].pid)
    assert daemon.stop() == 0


LINGER = """\
import json, os, sys, time
fds = []
for name in os.listdir("/proc/self/fd"):
    try:
        fds.append(os.readlink(f"/proc/self/fd/{name}"))
    except OSError:
        pass  # the listing's own descriptor, closed by now
with open(sys.argv[1] + ".tmp", "w") as out:
    json.dump({"pid": os.getpid(), "fds": fds}, out)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def _fd_targets(pid: int) -> list[str]:
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return targets


@ON_PG
def test_a_killed_daemons_steps_are_gone_before_a_new_daemon_starts(
    tmp_path: Path, make_daemon: Any
) -> None:
    """The guardian holds the instance lock (never a step): after a SIGKILL the lock
    stays held until the guardian has swept the dead daemon's steps away, and a new
    daemon waits for it. The guardian is stopped (SIGSTOP) to stand for a slow sweep."""
    out, linger = tmp_path / "step.json", tmp_path / "linger.py"
    linger.write_text(LINGER)
    args = json.dumps([sys.executable, str(linger), str(out)])
    daemon = make_daemon(
        f"""
[database]
path = "state/dispatcher.db"
[daemon]
shutdown_grace = "0s"
kill_grace = "1s"
[runners.sh]
type = "exec"
[tasks.linger]
steps = [{{ name = "a", runner = "sh", args = {args} }}]
"""
    )
    lock = str((tmp_path / "state" / "dispatcher.db.lock").resolve())
    daemon.start()
    guardian = daemon.wait_for_event("daemon_started")["guardian_pid"]
    assert lock in _fd_targets(guardian)
    assert daemon.cli("submit", "linger").returncode == 0
    wait_until(out.exists, timeout=20, interval=0.05)
    step = json.loads(out.read_text())
    assert _alive(step["pid"]) and lock not in step["fds"]

    os.kill(guardian, signal.SIGSTOP)
    try:
        daemon.kill()
        daemon.start(wait=False)
        wait_until(
            lambda: (
                {"instance_lock_waiting", "daemon_started"}
                & {e.get("event") for e in daemon.events()}
            ),
            timeout=30,
            interval=0.05,
        )
        # The stopped guardian holds the lock: the new daemon waits, the step runs.
        assert "daemon_started" not in {e.get("event") for e in daemon.events()}
        assert _alive(step["pid"])
    finally:
        os.kill(guardian, signal.SIGCONT)

    daemon.wait_for_event("daemon_started", timeout=30)
    assert not _alive(step["pid"])
    assert daemon.wait_for_event("daemon_recovered")["attempts_interrupted"] == 1
    assert daemon.stop() == 0


@ON_PG
def test_health_and_second_daemon(tmp_path: Path, make_daemon: Any) -> None:
    daemon = make_daemon(config(tmp_path, global_=2))
    assert daemon.cli("health").returncode == 69
    daemon.start()
    wait_until(lambda: daemon.cli("health").returncode == 0, timeout=10)
    second = daemon.cli("run", timeout=20)
    assert second.returncode == 69
    assert second.stderr.count("\n") == 1
    assert "another dispatcher daemon" in second.stderr and "Traceback" not in second.stderr
    assert daemon.stop() == 0
    assert daemon.cli("health").returncode == 69


def test_missing_binary_fails_that_dispatch_and_the_daemon_goes_on(
    tmp_path: Path, make_daemon: Any
) -> None:
    extra = """
[tasks.broken]
steps = [{ name = "x", runner = "py", args = ["/nonexistent/tool", "--flag"] }]
"""
    daemon = make_daemon(config(tmp_path, global_=2, extra=extra))
    daemon.start()
    assert daemon.cli("submit", "broken").returncode == 0
    assert daemon.cli("submit", "one", "--param", "n=after", "--param", "secs=0").returncode == 0
    wait_until(lambda: all_final(daemon, 2), timeout=20)
    broken = daemon.cli_json("show", "1")
    assert broken["status"] == "failed"
    assert "cannot execute '/nonexistent/tool'" in broken["error"]
    assert daemon.cli_json("show", "2")["status"] == "succeeded"
    assert daemon.stop() == 0


def test_command_planner_valid_and_invalid_plans(tmp_path: Path, make_daemon: Any) -> None:
    planner = tmp_path / "planner.py"
    planner.write_text(
        "import json, sys\n"
        "d = json.load(sys.stdin)\n"
        "if d['params'].get('bad'):\n"
        "    print(json.dumps({'steps': [{'name': 'x', 'runner': 'gpu'}]}))\n"
        "else:\n"
        "    print(json.dumps({'steps': [{'name': 'n%d' % i, 'runner': 'noop'}"
        " for i in range(d['params']['count'])]}))\n"
    )
    extra = f"""
[tasks.planned]
planner = "command"
command = ["{sys.executable}", "{planner}"]
"""
    daemon = make_daemon(config(tmp_path, global_=2, extra=extra))
    daemon.start()
    daemon.cli("submit", "planned", "--params", '{"count": 3}')
    daemon.cli("submit", "planned", "--params", '{"bad": true}')
    wait_until(lambda: all_final(daemon, 2), timeout=20)
    good = daemon.cli_json("show", "1")
    assert good["status"] == "succeeded"
    assert [a["step"] for a in good["attempts"]] == ["(plan)", "n0", "n1", "n2"]
    bad = daemon.cli_json("show", "2")
    assert bad["status"] == "failed"
    assert bad["error"] == (
        "planner failed: invalid plan: plan.steps[0].runner: unknown runner 'gpu' (known: noop, py)"
    )
    assert daemon.stop() == 0


def test_concurrency_key_caps_each_value(tmp_path: Path, make_daemon: Any) -> None:
    """`concurrency = 1` with `concurrency_key = "{repo}"`: one per repository at a time."""
    log = tmp_path / "steps.log"
    extra = f"""
[tasks.build]
concurrency = 1
concurrency_key = "{{repo}}"
steps = [{{ name = "b", runner = "py", \
args = ["{sys.executable}", "-S", "{STEP}", "{log}", "{{repo}}-{{n}}", "0.4"] }}]
"""
    daemon = make_daemon(config(tmp_path, global_=4, extra=extra))
    lines = [
        json.dumps({"task": "build", "params": {"repo": repo, "n": str(n)}})
        for n in range(3)
        for repo in ("core", "docs")
    ]
    daemon.cli("submit", "--batch", "-", stdin="\n".join(lines) + "\n")
    daemon.start()
    wait_until(lambda: all_final(daemon, 6), timeout=60)
    assert daemon.stop() == 0
    records = read_records(log)
    for repo in ("core", "docs"):
        assert peak_concurrency([r for r in records if r.label.startswith(repo)]) == 1
    assert peak_concurrency(records) == 2  # the two repositories ran side by side


def test_timeout_then_retry(tmp_path: Path, make_daemon: Any) -> None:
    log = tmp_path / "steps.log"
    extra = f"""
[tasks.slow]
steps = [{{ name = "s", runner = "py", timeout = "300ms", retries = 1, backoff = "100ms", \
args = ["{sys.executable}", "-S", "{STEP}", "{log}", "slow", "5"] }}]
"""
    daemon = make_daemon(config(tmp_path, global_=2, extra=extra))
    daemon.start()
    daemon.cli("submit", "slow")
    wait_until(lambda: all_final(daemon, 1), timeout=30)
    shown = daemon.cli_json("show", "1")
    assert shown["status"] == "failed"
    assert [a["status"] for a in shown["attempts"]] == ["timed_out", "timed_out"]
    assert "timed out after 300ms" in shown["error"]
    assert daemon.stop() == 0
    starts = [r for r in read_records(log) if r.kind == "start"]
    assert len(starts) == 2 and not any(_alive(r.pid) for r in starts)
