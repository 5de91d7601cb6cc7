"""CLI answers: JSON shapes, exit codes and one clear line for each mistake."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

CONFIG = """
[database]
path = "state/dispatcher.db"

[runners.noop]
type = "noop"

[tasks.greet]
steps = [{ name = "a", runner = "noop", args = ["{who}"] }]
"""


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    return make_daemon(CONFIG)


def one_line_error(result: Any, code: int, fragment: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stderr.startswith("dispatcher: error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_idempotent_submit(daemon: Any) -> None:
    first = daemon.cli_json("submit", "greet", "--param", "who=a", "--key", "k")
    assert first == {"id": 1, "status": "queued", "created": True}
    again = daemon.cli_json("submit", "greet", "--param", "who=a", "--key", "k")
    assert again == {"id": 1, "status": "queued", "created": False}
    conflict = daemon.cli("submit", "greet", "--param", "who=b", "--key", "k")
    one_line_error(conflict, 65, "idempotency key 'k' already belongs to dispatch 1")
    shown = daemon.cli_json("show", "1")
    assert shown["attempts"] == [] and shown["plan"] is None
    # reserving never takes a slot
    assert daemon.cli_json("gates")["rows"] == {"held": 0, "released": 0, "purgeable": 0}


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["submit", "nope"], 65, "unknown task 'nope' (known: greet)"),
        (["submit", "greet"], 65, "task 'greet': missing param 'who'"),
        (["submit", "greet", "--params", "{bad"], 65, "--params: invalid JSON"),
        (["submit", "greet", "--params", "[1]"], 65, "--params: expected a JSON object"),
        (["submit", "greet", "--param", "novalue"], 65, "--param 'novalue': expected NAME=VALUE"),
        (["show", "42"], 65, "no dispatch with id 42"),
        (["cancel", "42"], 65, "no dispatch with id 42"),
    ],
)
def test_bad_input_gets_one_line_and_its_exit_code(
    daemon: Any, args: list[str], code: int, fragment: str
) -> None:
    one_line_error(daemon.cli(*args), code, fragment)
    assert daemon.cli_json("list") == []  # nothing half-written


def test_usage_error_exits_2(daemon: Any) -> None:
    result = daemon.cli("show", "not-a-number")
    assert result.returncode == 2


def test_bad_config_exits_78_naming_file_and_key(daemon: Any) -> None:
    daemon.config.write_text(CONFIG + "\n[gate]\nglobal = 0\n")
    for command in (["check-config"], ["list"], ["run"]):
        result = daemon.cli(*command)
        one_line_error(result, 78, f"{daemon.config}: gate.global:")


def test_check_config_ok(daemon: Any) -> None:
    result = daemon.cli("check-config")
    assert result.returncode == 0 and "ok" in result.stdout


def test_batch_submit_and_refusal(daemon: Any, tmp_path: Path) -> None:
    lines = [
        json.dumps({"task": "greet", "params": {"who": str(n)}, "key": f"k{n}"}) for n in range(5)
    ]
    result = daemon.cli("submit", "--batch", "-", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["created"] for a in answers] == [True] * 5
    again = daemon.cli("submit", "--batch", "-", stdin="\n".join(lines) + "\n")
    assert [json.loads(line)["created"] for line in again.stdout.splitlines()] == [False] * 5
    bad = [*lines[:2], '{"task": "greet", "params": {}}']
    refused = daemon.cli("submit", "--batch", "-", stdin="\n".join(bad) + "\n")
    one_line_error(refused, 65, "batch line 3: task 'greet': missing param 'who'")
    assert len(daemon.cli_json("list")) == 5  # the refused batch wrote nothing
