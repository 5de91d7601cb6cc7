"""Declared params through the real CLI and the real daemon's API: the same checks,
exit 65 / HTTP 422 naming the param; `dispatcher tasks`; check-config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .httphelp import api_url, call
from .test_cli import one_line_error

pytestmark = pytest.mark.slow

CONFIG = """
[database]
path = "state/dispatcher.db"

[daemon]
poll_interval = "200ms"

[runners.noop]
type = "noop"

[tasks.deploy]
description = "roll a service out"
steps = [{ name = "roll", runner = "noop", args = ["{service}", "{replicas}", "{env}"] }]

[tasks.deploy.params.service]
description = "which service"

[tasks.deploy.params.replicas]
type = "int"
default = 2

[tasks.deploy.params.env]
type = ["staging", "production"]
default = "staging"

[tasks.deploy.params.dry_run]
type = "bool"
default = false

[tasks.loose]
steps = [{ name = "echo", runner = "noop", args = ["{who}"] }]

[api]
listen = "127.0.0.1:0"
"""


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    return make_daemon(CONFIG)


def test_tasks_lists_tasks_and_their_params(daemon: Any) -> None:
    text = daemon.cli("tasks").stdout
    assert text.splitlines() == [
        "deploy  roll a service out",
        "    dry_run          bool, default false",
        '    env              one of "staging", "production", default "staging"',
        "    replicas         int, default 2",
        "    service          str, required  which service",
        "loose",
        "    who              required (used by a step; not declared)",
    ]
    tasks = daemon.cli_json("tasks")["tasks"]
    assert [t["name"] for t in tasks] == ["deploy", "loose"]
    assert tasks[0]["params"][1]["type"] == ["staging", "production"]


def test_submit_checks_declared_params_and_fills_defaults(daemon: Any) -> None:
    ok = daemon.cli_json("submit", "deploy", "--param", "service=web", "--param", "replicas=5")
    shown = daemon.cli_json("show", str(ok["id"]))
    assert shown["params"] == {
        "service": "web",
        "replicas": 5,
        "env": "staging",
        "dry_run": False,
    }
    cases = [
        (["--param", "service=web", "--param", "replicas=five"], "--param replicas: task"),
        (["--param", "service=web", "--param", "env=prod"], "expected one of 'staging'"),
        (["--param", "service=web", "--param", "region=eu"], "unknown param 'region'"),
        (["--params", '{"service": "web", "replicas": "5"}'], "param 'replicas': expected an"),
        ([], "task 'deploy': missing param 'service' (str)"),
    ]
    for args, fragment in cases:
        one_line_error(daemon.cli("submit", "deploy", *args), 65, fragment)
    assert len(daemon.cli_json("list")) == 1


def test_a_param_given_twice_is_refused_not_overridden(daemon: Any) -> None:
    both = daemon.cli("submit", "loose", "--params", '{"who": "a"}', "--param", "who=b")
    one_line_error(both, 2, "param 'who' given by both --params and --param")
    twice = daemon.cli("submit", "loose", "--param", "who=a", "--param", "who=b")
    one_line_error(twice, 2, "--param who: given twice")
    assert daemon.cli_json("list") == []


def test_an_undeclared_task_warns_on_a_param_no_step_uses(daemon: Any) -> None:
    result = daemon.cli("submit", "loose", "--param", "who=a", "--param", "whom=b")
    assert result.returncode == 0 and result.stdout == "1 queued (created)\n"
    assert result.stderr == (
        "dispatcher: warning: task 'loose': param 'whom' used by no step "
        "(stored anyway; declare the task's params to refuse unknown ones)\n"
    )


def test_the_api_checks_declared_params_with_422_naming_the_param(daemon: Any) -> None:
    daemon.start()
    url = api_url(daemon)
    bad = call("POST", f"{url}/v1/dispatches", {"task": "deploy", "params": {"service": 1}})
    assert bad.status == 422
    assert bad.json()["error"]["message"] == (
        "task 'deploy': param 'service': expected a string, got an integer (1)"
    )
    good = call("POST", f"{url}/v1/dispatches", {"task": "deploy", "params": {"service": "x"}})
    assert good.status == 201 and "warnings" not in good.json()
    loose = call("POST", f"{url}/v1/dispatches", {"task": "loose", "params": {"who": 1, "x": 2}})
    assert loose.status == 201
    assert loose.json()["warnings"] == [
        "task 'loose': param 'x' used by no step "
        "(stored anyway; declare the task's params to refuse unknown ones)"
    ]
    assert daemon.stop() == 0


def test_check_config_refuses_a_template_that_uses_an_undeclared_param(daemon: Any) -> None:
    daemon.config.write_text(CONFIG.replace('"{env}"', '"{environment}"'))
    result = daemon.cli("check-config")
    one_line_error(result, 78, "tasks.deploy: step 'roll' uses {environment}, which is not")
    daemon.config.write_text(CONFIG.replace("default = 2", 'default = "two"'))
    one_line_error(
        daemon.cli("check-config"), 78, "tasks.deploy.params.replicas: default 'two': expected"
    )


def test_batch_lines_are_checked_against_declarations(daemon: Any, tmp_path: Path) -> None:
    lines = [
        {"task": "deploy", "params": {"service": "a"}},
        {"task": "deploy", "params": {"service": "b", "replicas": 1.5}},
    ]
    batch = "".join(json.dumps(line) + "\n" for line in lines)
    result = daemon.cli("submit", "--batch", "-", stdin=batch)
    assert result.returncode == 65
    assert "batch line 2: task 'deploy': param 'replicas': expected an integer" in result.stderr
