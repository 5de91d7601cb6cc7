"""Parallel branches, results and step context with the real daemon and real processes;
concurrency and timing come from what the steps record themselves."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import peak_concurrency, read_records, wait_until

pytestmark = pytest.mark.slow

GRAPHSTEP = Path(__file__).with_name("graphstep.py")


def config(tmp_path: Path, tasks: str, *, cap: int | None = None) -> str:
    concurrency = f"concurrency = {cap}" if cap else ""
    return f"""
[database]
path = "state/dispatcher.db"

[daemon]
poll_interval = "100ms"
heartbeat_interval = "500ms"
instance_ttl = "3s"
kill_grace = "1s"

[gate]
global = 1

[runners.sh]
type = "exec"
{concurrency}

{tasks}
"""


def step(tmp_path: Path, label: str, seconds: str, *more: str, tail: str = "") -> str:
    """The args of a graphstep.py step (TOML), recording to steps.log."""
    args = [sys.executable, str(GRAPHSTEP), str(tmp_path / "steps.log"), label, seconds, *more]
    quoted = ", ".join(json.dumps(arg) for arg in args)
    return f"[{quoted}{', ' + tail if tail else ''}]"


def facts(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "steps.log.json"
    return [json.loads(line) for line in path.read_text().splitlines()]


FINAL = ("succeeded", "failed", "cancelled")


def finished(daemon: Any, dispatch_id: int) -> dict[str, Any]:
    """`show --json` of the dispatch once it is final."""
    daemon.wait_status(dispatch_id, *FINAL, timeout=90)
    shown: dict[str, Any] = daemon.cli_json("show", str(dispatch_id))
    return shown


def submit(daemon: Any, task: str, *args: str) -> int:
    answer = daemon.cli("submit", task, *args, "--json")
    assert answer.returncode == 0, answer.stderr
    dispatch_id: int = json.loads(answer.stdout)["id"]
    return dispatch_id


def test_two_one_second_branches_finish_in_about_one_second_not_two(
    tmp_path: Path, make_daemon: Any
) -> None:
    tasks = f"""
[tasks.pair]
steps = [
  {{ name = "left", runner = "sh", needs = [], args = {step(tmp_path, "left", "1")} }},
  {{ name = "right", runner = "sh", needs = [], args = {step(tmp_path, "right", "1")} }},
]
"""
    daemon = make_daemon(config(tmp_path, tasks))
    daemon.start()
    assert finished(daemon, submit(daemon, "pair"))["status"] == "succeeded"
    assert daemon.stop() == 0

    records = read_records(tmp_path / "steps.log")
    assert len(records) == 4
    assert peak_concurrency(records) == 2
    span = max(r.at for r in records) - min(r.at for r in records)
    print(f"two 1 s branches took {span:.3f} s")  # the figure for the report
    assert span < 2.0  # one after the other they take 2 s at least


def test_a_result_of_step_one_reaches_the_argv_of_step_two(
    tmp_path: Path, make_daemon: Any
) -> None:
    artifact = {"artifact": "/srv/out/app 1.2.tar", "size": 3}
    escaped = json.dumps(artifact).replace("{", "{{").replace("}", "}}")  # a literal arg
    build = step(tmp_path, "build", "0", escaped)
    deploy = step(tmp_path, "deploy", "0", tail='"--", "{steps.build.result.artifact}", "{to}"')
    tasks = f"""
[tasks.ship]
steps = [
  {{ name = "build", runner = "sh", args = {build} }},
  {{ name = "deploy", runner = "sh", args = {deploy} }},
]
"""
    daemon = make_daemon(config(tmp_path, tasks))
    daemon.start()
    dispatch_id = submit(daemon, "ship", "--param", "to=prod")
    shown = finished(daemon, dispatch_id)
    assert shown["status"] == "succeeded", shown["error"]

    deploy = next(fact for fact in facts(tmp_path) if fact["label"] == "deploy")
    assert deploy["argv"] == ["/srv/out/app 1.2.tar", "prod"]
    assert shown["attempts"][0]["result"] == artifact
    text = daemon.cli("show", str(dispatch_id)).stdout
    assert 'result {"artifact": "/srv/out/app 1.2.tar", "size": 3}' in text
    assert daemon.stop() == 0


def test_after_a_sigkill_mid_graph_only_the_unfinished_branches_run_again(
    tmp_path: Path, make_daemon: Any
) -> None:
    join = step(tmp_path, "join", "0", tail='"--", "{steps.a.result}"')
    tasks = f"""
[tasks.graph]
steps = [
  {{ name = "a", runner = "sh", args = {step(tmp_path, "a", "0", '"from a"')} }},
  {{ name = "slow", runner = "sh", needs = ["a"], args = {step(tmp_path, "slow", "60/0.2")} }},
  {{ name = "quick", runner = "sh", needs = ["a"], args = {step(tmp_path, "quick", "0")} }},
  {{ name = "join", runner = "sh", needs = ["slow", "quick"], args = {join} }},
]
"""
    daemon = make_daemon(config(tmp_path, tasks))
    daemon.start()
    dispatch_id = submit(daemon, "graph")
    log = tmp_path / "steps.log"

    def slow_runs_and_quick_ended() -> bool:
        seen = {(r.kind, r.label) for r in read_records(log)}
        # quick's success durable, not only ended: a step whose end the daemon had not
        # recorded when it died runs again (at least once), and this test is about those
        # whose success was recorded.
        recorded = daemon.query("SELECT step FROM attempts WHERE status = 'succeeded'")
        return ("start", "slow") in seen and ("quick",) in recorded

    wait_until(slow_runs_and_quick_ended, timeout=30)
    daemon.kill()  # SIGKILL: the orphan guard ends slow's process
    daemon.start()
    shown = finished(daemon, dispatch_id)
    assert shown["status"] == "succeeded", shown["error"]
    assert daemon.stop() == 0

    starts = [r.label for r in read_records(log) if r.kind == "start"]
    assert sorted(starts) == ["a", "join", "quick", "slow", "slow"]
    runs = [(a["step"], a["attempt"], a["status"]) for a in shown["attempts"]]
    assert ("slow", 1, "interrupted") in runs and ("slow", 2, "succeeded") in runs
    assert [f["argv"] for f in facts(tmp_path) if f["label"] == "join"] == [["from a"]]


def test_the_step_token_is_the_same_for_every_attempt_of_a_retried_step(
    tmp_path: Path, make_daemon: Any
) -> None:
    flaky = step(tmp_path, "flaky", "0", "-", "1,2")
    tasks = f"""
[tasks.flaky]
steps = [
  {{ name = "first", runner = "sh", args = {step(tmp_path, "first", "0")} }},
  {{ name = "flaky", runner = "sh", retries = 2, backoff = "100ms", args = {flaky} }},
]
"""
    daemon = make_daemon(config(tmp_path, tasks))
    daemon.start()
    dispatch_id = submit(daemon, "flaky", "--key", "release-7")
    shown = finished(daemon, dispatch_id)
    assert shown["status"] == "succeeded", shown["error"]
    assert daemon.stop() == 0

    envs = {(f["label"], f["env"]["DISPATCHER_ATTEMPT"]): f["env"] for f in facts(tmp_path)}
    assert sorted(envs) == [("first", "1"), ("flaky", "1"), ("flaky", "2"), ("flaky", "3")]
    tokens: dict[str, set[str]] = {label: set() for label, _ in envs}
    for (label, _), env in envs.items():
        tokens[label].add(env["DISPATCHER_STEP_TOKEN"])
        assert env["DISPATCHER_DISPATCH_ID"] == str(dispatch_id)
        assert (env["DISPATCHER_TASK"], env["DISPATCHER_KEY"]) == ("flaky", "release-7")
        assert env["DISPATCHER_STEP"] == label
    assert len(tokens["flaky"]) == 1 and len(tokens["first"]) == 1
    assert tokens["flaky"] != tokens["first"]


def test_a_runner_cap_of_one_serializes_two_branches(tmp_path: Path, make_daemon: Any) -> None:
    tasks = f"""
[tasks.pair]
steps = [
  {{ name = "left", runner = "sh", needs = [], args = {step(tmp_path, "left", "0.5")} }},
  {{ name = "right", runner = "sh", needs = [], args = {step(tmp_path, "right", "0.5")} }},
]
"""
    daemon = make_daemon(config(tmp_path, tasks, cap=1))
    daemon.start()
    shown = finished(daemon, submit(daemon, "pair"))
    assert shown["status"] == "succeeded", shown["error"]
    assert daemon.stop() == 0

    records = read_records(tmp_path / "steps.log")
    assert len([r for r in records if r.kind == "start"]) == 2
    assert peak_concurrency(records) == 1


def test_check_config_refuses_a_cycle_with_one_line_and_78(
    tmp_path: Path, make_daemon: Any
) -> None:
    tasks = """
[tasks.loop]
steps = [
  { name = "a", runner = "sh", needs = ["b"] },
  { name = "b", runner = "sh", args = ["{steps.a.result}"] },
]
"""
    daemon = make_daemon(config(tmp_path, tasks), init=False)
    checked = daemon.cli("check-config")
    assert checked.returncode == 78
    assert checked.stderr.strip().endswith("tasks.loop: steps form a cycle: a -> b -> a")
    assert len(checked.stderr.strip().splitlines()) == 1
